"""``import scatlas`` stays cheap: it loads none of the heavy libraries (NumPy, SciPy, JAX,
anndata), which load with the submodule that needs them (issue 18: under 0.5 s; measured
0.027 s with ``python -X importtime -c 'import scatlas'``). No timing is asserted: the
invariant is which modules a bare import pulls in."""

import subprocess
import sys


def test_bare_import_loads_no_heavy_library():
    code = ("import sys, scatlas; heavy = ('numpy', 'scipy', 'jax', 'anndata', 'pandas'); "
            "print(','.join(m for m in heavy if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == ""


def test_lazy_names_resolve():
    import scatlas

    assert callable(scatlas.gpu_available) and callable(scatlas.resolve_device)
    assert scatlas.exceptions.ScatlasInputError.__module__ == "scatlas.exceptions"
