"""notebooks/demo.ipynb runs top to bottom in a headless kernel (nbclient), as CI runs it.

On the embedded model when it is installed, else on the tiny random pipeline (the notebook's
MODEL variable reads DALLE_MINI_MODEL).
"""

from pathlib import Path

import nbformat
from nbclient import NotebookClient
from tiny_pipeline import build_tiny_pipeline

from dalle_mini.hub import embedded_folder

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "demo.ipynb"


def test_demo_notebook_executes_and_shows_images(tmp_path, monkeypatch):
    if (embedded_folder("dallebart") / "flax_model.msgpack").is_file():
        model = "embedded"
    else:
        model = str(build_tiny_pipeline(tmp_path / "tiny"))
    monkeypatch.setenv("DALLE_MINI_MODEL", model)  # the kernel inherits the environment
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(
        notebook,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOK.parent)}},
    ).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert text.startswith(f"{model}: DalleBart")  # the model named first
    assert "#9: CLIP score" in text and "same pixels as image #5" in text
    assert "previews after [" in text and "swapped: mean pixel change" in text
    assert len(images) >= 5  # grid, previews, codes → pixels, the row swap, the regenerated image
