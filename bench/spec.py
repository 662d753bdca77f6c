"""What a benchmark module declares: its workload, its methods (ours and baselines), accuracy.

The runner (:mod:`bench.runner`) owns everything else: warm-up, repeats, medians, device
synchronisation, environment capture, JSON, tables and plots.

A benchmark module defines a module-level ``BENCHMARK = Benchmark(...)`` built from:

- ``build(size, device, params) -> Workload``: the data at one size (host copy and, for the
  methods that run on the selected device, a device copy), plus facts about it (``info``);
- ``methods(params) -> list[Method]``: our call(s) and the baseline call(s), each a function of
  the workload;
- ``accuracy(workload, method, output) -> dict[str, float]``: accuracy of one method's output,
  recorded beside its timing so that "faster at equal accuracy" can be read off the table.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

Role = Literal["ours", "baseline"]


@dataclass
class Workload:
    """The data of one benchmark size.

    ``host`` is the CPU copy (baselines use it), ``data`` the copy on the selected device (our
    kernels use it; the same object as ``host`` on the CPU). ``info`` goes into the JSON
    (shapes, nnz, build time, spectral gaps ...). ``extra`` holds anything else the methods or
    the accuracy function need (an exact reference, say); it is not recorded.
    """

    host: Any
    data: Any
    info: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Method:
    """One timed call.

    ``call(workload)`` returns the method's output (passed to the accuracy function).
    ``group`` pairs baselines with the first ``ours`` method of the same group: the table's
    ratio is ``median(method) / median(ours)``. ``on_device`` marks methods that run on the
    selected device (the runner synchronises the GPU around them); the others run on the CPU.
    Above ``max_size`` the method is skipped and ``skip_reason`` is recorded.
    """

    name: str
    call: Callable[[Workload], Any]
    role: Role = "baseline"
    group: str = "main"
    description: str = ""
    on_device: bool = False
    max_size: int | None = None
    skip_reason: str = ""

    def skip_message(self, size: int) -> str | None:
        """Why this method is skipped at ``size``, or None when it runs."""
        if self.max_size is None or size <= self.max_size:
            return None
        reason = self.skip_reason or "too slow or too large at this size"
        return f"{reason} (size {size:,} > limit {self.max_size:,})"


@dataclass(frozen=True)
class Metric:
    """An accuracy column: its table header, number format and which direction is better."""

    label: str
    fmt: str = ".3g"
    higher_is_better: bool = False

    def to_json(self) -> dict[str, Any]:
        """The JSON form stored with every result file (the report needs no module import)."""
        return {"label": self.label, "fmt": self.fmt, "higher_is_better": self.higher_is_better}


@dataclass(frozen=True)
class Benchmark:
    """A named benchmark: the runner's whole view of a benchmark module."""

    name: str
    description: str
    build: Callable[[int, str, Mapping[str, Any]], Workload]
    methods: Callable[[Mapping[str, Any]], Sequence[Method]]
    accuracy: Callable[[Workload, Method, Any], Mapping[str, float]]
    metrics: Mapping[str, Metric] = field(default_factory=dict)
    default_sizes: tuple[int, ...] = ()
    default_params: Mapping[str, Any] = field(default_factory=dict)
    size_label: str = "size"
