"""`dalle-mini generate` / `regenerate` as a person runs them: files written, knobs documented,
bad input reported in one line with exit status 2."""

import json

import numpy as np
import pytest
from PIL import Image
from tiny_pipeline import build_tiny_pipeline

from dalle_mini import cli
from dalle_mini.pipeline import Pipeline

PROMPT = "a red circle on a blue background"


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def generated(model_folder, tmp_path_factory):
    """One real run: loads the model named by --model and writes into --out."""
    out = tmp_path_factory.mktemp("out")
    status = cli.main(
        [
            "generate",
            PROMPT,
            "--num-images",
            "4",
            "--num-candidates",
            "8",
            "--seed",
            "3",
            "--top-p",
            "0.9",
            "--model",
            str(model_folder),
            "--out",
            str(out),
        ]
    )
    assert status == 0
    return out


@pytest.fixture(scope="module")
def pipe(model_folder):
    return Pipeline.from_pretrained(model_folder)


@pytest.fixture
def loaded(pipe, monkeypatch):
    """Later runs reuse one loaded pipeline (loading is tested by `generated`); records the
    model each run asked for."""
    asked = []

    def load(args, default_model="embedded", default_dtype="float32"):
        asked.append(args.model or default_model)
        return pipe

    monkeypatch.setattr(cli, "load_pipeline", load)
    return asked


def test_generate_writes_the_grid_each_image_and_settings(generated, capsys):
    names = sorted(p.name for p in generated.iterdir())
    assert names == ["grid.png"] + [f"image_{i:02d}.png" for i in range(1, 5)] + ["result.json"]
    assert Image.open(generated / "grid.png").size == (64, 64)
    assert Image.open(generated / "image_01.png").size == (32, 32)
    result = json.loads((generated / "result.json").read_text())
    scores = [image["score"] for image in result["images"]]
    assert scores == sorted(scores, reverse=True) and result["num_candidates"] == 8
    settings = result["images"][0]["settings"]
    assert (settings["prompt"], settings["seed"], settings["top_p"]) == (PROMPT, 3, 0.9)


def test_generate_shows_progress_and_a_summary(model_folder, tmp_path, capsys, loaded):
    assert (
        cli.main(
            [
                "generate",
                PROMPT,
                "--num-images",
                "2",
                "--num-candidates",
                "8",
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    captured = capsys.readouterr()
    assert "sampling" in captured.err and "64/64" in captured.err  # the tqdm bar
    assert "2 of 8 candidates" in captured.out and "image_01.png" in captured.out
    assert loaded == ["embedded"]  # the default model


def test_several_prompts_go_to_numbered_folders(tmp_path, loaded):
    status = cli.main(
        [
            "generate",
            PROMPT,
            "a purple star",
            "--num-images",
            "2",
            "--num-candidates",
            "4",
            "--out",
            str(tmp_path),
            "--quiet",
        ]
    )
    assert status == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["01", "02"]
    second = json.loads((tmp_path / "02" / "result.json").read_text())
    assert second["prompt"] == "a purple star" and len(second["images"]) == 2


def test_regenerate_gives_the_same_image(generated, model_folder, tmp_path, loaded):
    assert (
        cli.main(
            ["regenerate", str(generated / "result.json"), "--image", "3", "--out", str(tmp_path)]
        )
        == 0
    )
    assert loaded == [str(model_folder)]  # the model named in the settings
    (written,) = tmp_path.iterdir()
    original = np.asarray(Image.open(generated / "image_03.png"))
    assert np.array_equal(np.asarray(Image.open(written)), original)


def test_help_documents_every_knob(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["generate", "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # undo the line wrapping
    for option in (
        "--num-images",
        "--num-candidates",
        "--seed",
        "--temperature",
        "--top-k",
        "--top-p",
        "--condition-scale",
        "--no-rerank",
        "--model",
        "--dtype",
        "--out",
    ):
        assert option in text
    assert "0 turns it off" in text and "how strongly to follow the prompt" in text
    assert "uncond + condition_scale * (cond - uncond)" in text


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate", "   "], "the prompt is empty"),
        (["generate", PROMPT, "--temperature", "-1"], "temperature=-1.0 is out of range"),
        (["generate", PROMPT, "--num-images", "20"], "num_images=20 is out of range"),
        (["generate", PROMPT, "--top-p", "2"], "top_p=2.0 is out of range"),
        (["regenerate", "/nonexistent/result.json"], "cannot read settings"),
    ],
)
def test_bad_input_is_one_clear_line(argv, message, capsys, loaded):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_bad_regenerate_selection(generated, capsys, loaded):
    assert cli.main(["regenerate", str(generated / "result.json"), "--image", "9"]) == 2
    assert "--image 9 is out of range: the result has 4 images" in capsys.readouterr().err


def test_argument_types_are_checked_by_the_parser(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["generate", PROMPT, "--seed", "three"])
    assert exit_info.value.code == 2
    assert "invalid int value: 'three'" in capsys.readouterr().err
