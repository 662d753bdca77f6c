"""``in_caller_terms``: library messages (Python argument names) rewritten in a front end's terms
(issue 16, item 5); each case against the text a command-line user can act on."""

from __future__ import annotations

import pytest

from scatlas._validate import ScatlasInputError, check_obs_key, check_positive_int, in_caller_terms
from scatlas.cli.models import FLAGS, VALUES

TRAIN = FLAGS["train metric"]


@pytest.mark.parametrize("message, expected", [
    ("pass input='lognorm' if it is log-normalised", "pass --input-kind lognorm if it is "
                                                     "log-normalised"),
    ("pass layer= (or use_raw=True for adata.raw)", "pass --layer (or --use-raw for adata.raw)"),
    ("read X instead (use_raw=False, layer=)", "read X instead (--no-use-raw, --layer)"),
    ("sample uniformly (balance=None)", "sample uniformly (--balance none)"),
    ("every gene (n_top_genes=None)", "every gene (--n-top-genes 0)"),
    ("below min_overlap=50.0%; lower min_overlap to accept", "below --min-overlap 0.5; lower "
                                                             "--min-overlap to accept"),
    ("or lower learning_rate (no checkpoint)", "or lower --lr (no checkpoint)"),
    ("sparse_step=True is not possible", "--sparse-step on is not possible"),
    # not parameters: attributes, indexing, quoted values and unknown names stay
    ("layers['layer'] is not in adata.layers", "layers['layer'] is not in adata.layers"),
    ("adata.var_names has duplicates", "adata.var_names has duplicates"),
    ("or set data_parallel=False", "or set data_parallel=False"),
    ("the input holds 3 negative values", "the input holds 3 negative values"),
])
def test_rewrites_python_names_as_flags(message, expected):
    assert in_caller_terms(message, TRAIN, values=VALUES) == expected


def test_the_parameter_at_fault_leads_the_message():
    with pytest.raises(ScatlasInputError) as err:
        check_positive_int(0, "batch_size")
    assert err.value.param == "batch_size"
    assert in_caller_terms(err.value, TRAIN) == "--batch-size must be >= 1, got 0"
    # a name without an underscore is rewritten only where it is the error's parameter
    err = ScatlasInputError("dropout must be in [0, 1), got 2", param="dropout")
    assert in_caller_terms(err, TRAIN) == "--dropout must be in [0, 1), got 2"
    assert in_caller_terms("dropout must be in [0, 1)", TRAIN) == "dropout must be in [0, 1)"


def test_obs_keys_name_their_flag():
    import anndata as ad
    import numpy as np

    a = ad.AnnData(np.zeros((2, 2)))
    with pytest.raises(ScatlasInputError) as err:
        check_obs_key(a, "nope", "study_key")
    assert err.value.param == "study_key"
    assert in_caller_terms(err.value, TRAIN).startswith("--study-key 'nope' is not a column")


def test_paths_and_file_names_are_left_alone():
    for text in ("no such file /data/batch_size/x.h5ad", "see batch_size.h5ad",
                 "C:\\runs\\batch_size\\x"):
        assert in_caller_terms(text, TRAIN, param="batch_size") == text
    assert in_caller_terms("then lower learning_rate.", TRAIN) == "then lower --lr."
