import json

import pytest

from pipeline.files import atomic_write, write_json, write_text


def test_write_text_leaves_no_scratch_file(tmp_path):
    path = tmp_path / "reports" / "comparison.md"
    write_text(path, "first")
    write_text(path, "second")
    assert path.read_text() == "second"
    assert [child.name for child in path.parent.iterdir()] == ["comparison.md"]


def test_an_interrupted_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "metrics.json"
    write_json(path, {"loss": 1.0})
    with pytest.raises(RuntimeError):
        with atomic_write(path) as temporary:
            temporary.write_text("{half")
            raise RuntimeError("killed")
    assert json.loads(path.read_text()) == {"loss": 1.0}
    assert [child.name for child in tmp_path.iterdir()] == ["metrics.json"]
