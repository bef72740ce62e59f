"""Careless input to `tilefuse models | ingest | demo`: each is one line naming the problem and a fix that works,
exit status 2, nothing written and nothing replaced."""

from __future__ import annotations

import pytest
from test_careless_ingest import one_line, run_cli, tifs, tree  # noqa: F401  (tifs: a fixture)

from tilefuse.errors import InputError

# models ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "setting, words",
    [
        ("modalities={bad", ["modalities", "JSON object", "'{bad'"]),
        ("modalities=5", ["modalities", "JSON object", "got 5"]),
        ("modalities=[1]", ["modalities", "JSON object", "got [1]"]),
        ("modalities=null", ["modalities", "JSON object", "got null"]),
        ("modalities={}", ["modalities", "JSON object", "got {}"]),
        ('modalities={"optical": 3, "sar": 2.5}', ["modalities", "'sar'", "whole number >= 1", "got 2.5"]),
        ('modalities={"optical": 3, "sar": true}', ["modalities", "'sar'", "whole number >= 1", "got true"]),
        ("num_classes=NaN", ["num_classes", "whole number >= 1", "got NaN"]),
        ("num_classes=1e400", ["num_classes", "whole number >= 1", "got Infinity"]),
        ("num_classes=2.5", ["num_classes", "whole number >= 1", "got 2.5"]),
        ("num_classes=true", ["num_classes", "whole number >= 1", "got true"]),
        ("num_classes=null", ["num_classes", "whole number >= 1", "got null"]),
        ("num_classes=six", ["num_classes", "whole number >= 1", "'six'"]),
    ],
)
def test_models_set_of_the_wrong_type_is_one_line_naming_the_key(setting, words, capsys):
    """`tilefuse models pad --set modalities=5` (or '{bad', [1], num_classes=NaN, 1e400) ended in a 46-line traceback,
    exit 1; num_classes=2.5 was shown as 2 classes and num_classes=true as 1."""
    for model in ("pad", "s2fin"):
        code, out, err = run_cli(["models", model, "--set", setting], capsys)
        line = one_line(code, err, "--set")
        assert all(word in line for word in words), line
        assert out == ""


def test_models_api_refuses_the_same_settings_and_good_ones_still_count(capsys):
    from tilefuse.pipelines.models import describe_models

    for overrides in ({"num_classes": 2.5}, {"num_classes": True}, {"modalities": [("optical", 3)]}, {"modalities": {"optical": "3"}}):
        with pytest.raises(InputError, match="overrides"):
            describe_models("pad", overrides)
    import numpy as np

    (record,) = describe_models("pad", {"num_classes": np.int64(5), "modalities": {"optical": np.int32(4), "sar": 2}})
    assert record["example"]["num_classes"] == 5 and record["example"]["modalities"] == {"optical": 4, "sar": 2}
    code, out, err = run_cli(["models", "pad", "--set", "num_classes=6", "--set", 'modalities={"optical": 4, "sar": 2}'], capsys)
    assert code == 0, err
    assert "optical:4, sar:2; 6 classes" in out
