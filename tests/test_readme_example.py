"""The README's Python example runs as written (on tiny settings) and ends in a saved model
that loads back and predicts the same logits."""

import re
from pathlib import Path

README = Path(__file__).parents[1] / "README.md"

#: the README's sizes -> tiny ones (same code, seconds instead of minutes)
TINY = [("phantom?n=2000&size=64", "phantom?n=160&size=32"), ("size=64", "size=32"),  # img_size too
        ('"densenet121"', '"densenet_tiny"'),
        ("epochs=5", "epochs=1, batch_size=32"), ("evaluate(preds)", "evaluate(preds, n_boot=20)")]


def _example() -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README.md has no Python example"
    return blocks[0]


def test_readme_python_example_runs_and_saves_a_reloadable_model(tmp_path, monkeypatch):
    code = _example()
    assert "save_model(" in code and "load_model(" in code and "make_card(" in code
    for old, new in TINY:
        assert old in code, old
        code = code.replace(old, new)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MEDSCALPEL_PROGRESS", "0")
    scope: dict = {}
    exec(compile(code, str(README), "exec"), scope)  # noqa: S102 - our own README
    assert (tmp_path / "runs" / "my-model" / "model.json").is_file()
    assert scope["reloaded"].card.class_names == tuple(scope["train_ds"].class_names)
