"""Your own images and captions through the training pipeline (`--images`), not the world."""

import json

import numpy as np
import pytest
from PIL import Image

from dalle_mini.models.dallebart import DalleBart
from dalle_mini.models.vqgan import VQModel
from dalle_mini.scoring import CLIPScorer
from dalle_mini.train import cli, image_folder, world
from dalle_mini.train.data import read_encoded


def _own_folder(folder, count, layout="txt", size=(48, 40)):
    """`count` world drawings saved as non-square PNGs with their captions, the way a user's
    folder holds them: a .txt beside each image, or a metadata.jsonl / metadata.csv."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for index in range(count):
        image, caption, _ = world.example(7, "train", index, 48)
        name = f"pic_{index:02d}.png"
        Image.fromarray(image).resize(size).save(folder / name)
        rows.append((name, caption))
        if layout == "txt":
            (folder / name).with_suffix(".txt").write_text(caption + "\n")
    if layout == "jsonl":
        lines = [json.dumps({"file_name": name, "text": text}) for name, text in rows]
        (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    if layout == "csv":
        lines = ["file_name,caption"] + [f'{name},"{text}"' for name, text in rows]
        (folder / "metadata.csv").write_text("\n".join(lines) + "\n")
    return rows


@pytest.mark.parametrize("layout", ["txt", "jsonl", "csv"])
def test_a_folder_is_read_in_each_caption_layout(tmp_path, layout):
    rows = _own_folder(tmp_path / "mine", 5, layout)
    pairs = image_folder.list_pairs(tmp_path / "mine")
    assert [(path.name, text) for path, text in pairs] == sorted(rows)


def test_images_are_squared_by_their_centre_and_split_off_for_validation(tmp_path):
    folder = tmp_path / "mine"
    rows = _own_folder(folder, 20)
    wide = np.zeros((30, 90, 3), np.uint8)  # 90 wide: left third red, middle green, right blue
    wide[:, :30, 0] = wide[:, 30:60, 1] = wide[:, 60:, 2] = 255
    Image.fromarray(wide).save(folder / "wide.png")
    (folder / "wide.txt").write_text("  a green   middle\n")
    info = image_folder.import_folder(folder, tmp_path / "images", 32, seed=0)
    assert info["counts"] == {"train": 20, "valid": 1}  # 5% of 21, at least one
    train, captions, files = image_folder.load_split(tmp_path / "images", "train")
    valid, valid_captions, valid_files = image_folder.load_split(tmp_path / "images", "valid")
    assert train.shape == (20, 32, 32, 3) and train.dtype == np.uint8
    assert sorted(files + valid_files) == sorted([name for name, _ in rows] + ["wide.png"])
    assert not set(files) & set(valid_files)
    everything = dict(zip(files + valid_files, captions + valid_captions, strict=True))
    assert everything["wide.png"] == "a green middle"  # whitespace tidied
    squared = image_folder.square_image(folder / "wide.png", 32)
    assert squared.shape == (32, 32, 3)
    assert (squared[:, 4:28, 1] > 200).all() and (squared[:, 4:28, [0, 2]] < 50).all()
    # grey, palette and transparent images come out RGB, transparent parts white
    Image.new("L", (16, 16), 90).save(tmp_path / "grey.png")
    clear = Image.new("RGBA", (16, 16), (255, 0, 0, 0))
    clear.paste((0, 0, 255, 255), (0, 0, 8, 16))
    clear.save(tmp_path / "clear.png")
    assert (image_folder.square_image(tmp_path / "grey.png", 8) == 90).all()
    halves = image_folder.square_image(tmp_path / "clear.png", 16)
    assert (halves[:, :6] == [0, 0, 255]).all() and (halves[:, 10:] == 255).all()
    # the same seed holds out the same images
    image_folder.import_folder(folder, tmp_path / "again", 32, seed=0)
    assert image_folder.load_split(tmp_path / "again", "valid")[2] == valid_files


def test_a_bad_folder_names_the_file_and_the_fix(tmp_path):
    folder = tmp_path / "mine"
    _own_folder(folder, 3)
    (folder / "pic_01.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"pic_01\.png has no caption: write it to pic_01"):
        image_folder.list_pairs(folder)
    (folder / "pic_01.txt").write_text("   \n")
    with pytest.raises(ValueError, match=r"the caption of .*pic_01\.png is empty"):
        image_folder.list_pairs(folder)
    (folder / "pic_01.txt").write_text("a shape")
    (folder / "pic_02.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"pic_02\.png could not be read as an image"):
        image_folder.import_folder(folder, tmp_path / "images", 32)
    (folder / "metadata.jsonl").write_text(json.dumps({"file_name": "gone.png", "text": "x"}))
    with pytest.raises(FileNotFoundError, match=r"gone\.png is named in .* metadata but missing"):
        image_folder.list_pairs(folder)
    (folder / "metadata.jsonl").write_text(json.dumps({"file": "pic_00.png", "text": "x"}))
    with pytest.raises(ValueError, match=r"row 1: needs a `file_name` and a `text`"):
        image_folder.list_pairs(folder)
    with pytest.raises(FileNotFoundError, match="no image folder"):
        image_folder.list_pairs(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        image_folder.list_pairs(tmp_path / "empty")


def test_all_trains_and_measures_on_your_own_images(tmp_path, capsys):
    # every stage of the one command on a folder of images with captions, no world drawn
    folder, run, out = tmp_path / "mine", tmp_path / "run", tmp_path / "models"
    rows = _own_folder(folder, 40, "jsonl")
    argv = ["all", "--tiny", "--images", str(folder), "--workdir", str(run), "--out", str(out)]
    assert cli.main(argv) == 0
    assert not (run / "world").exists()
    captions, codes = read_encoded(run / "encoded" / "train.parquet")
    held = image_folder.load_split(run / "images", "valid")[1]
    assert sorted(captions + held) == sorted(text for _, text in rows)  # as written, no recaptions
    assert codes.shape == (len(captions), 64)  # 32 px images, 8x8 codes
    report = json.loads((out / "evaluation_report.json").read_text())
    assert report["data"] == "own images" and report["valid"]["num_prompts"] == len(held)
    assert report["valid"]["clip_score_kept"] >= report["valid"]["clip_score_all"]
    assert "Evaluation on your own images" in (out / "evaluation_report.md").read_text()
    assert DalleBart.from_pretrained(out / "dallebart")[0].config.image_length == 64
    assert VQModel.from_pretrained(out / "vqgan")[0].config.resolution == 32
    scorer = CLIPScorer.from_pretrained(out / "clip")
    assert scorer.score(held[0], [np.zeros((32, 32, 3), np.uint8)]).shape == (1,)
    # a workdir holds one dataset; the world's aids need the world
    assert cli.main(["world", "--workdir", str(run)]) == 2
    assert "holds your own images" in capsys.readouterr().err
    assert cli.main(["dallebart", "--workdir", str(run), "--partial-captions", "0.3"]) == 2
    assert "your own images has captions only" in capsys.readouterr().err
    assert cli.main(["clip", "--workdir", str(run), "--tiny", "--clip-miscount", "0.5"]) == 2
    assert "your own images have no scenes" in capsys.readouterr().err


def test_fine_tuning_the_embedded_models_on_your_own_images(tmp_path, capsys):
    # the embedded VQGAN encodes them, the embedded DalleBart fine-tunes: a run with no VQGAN
    # training whose models keep the embedded VQGAN and DalleBart sizes
    folder, run = tmp_path / "mine", tmp_path / "run"
    _own_folder(folder, 12, "txt", size=(64, 64))
    base = ["--workdir", str(run), "--vqgan", "embedded"]
    assert cli.main(["world", "--images", str(folder), *base]) == 0
    assert cli.main(["vqgan", *base]) == 0
    assert "nothing to train" in capsys.readouterr().out
    assert cli.main(["encode", *base]) == 0
    assert read_encoded(run / "encoded" / "train.parquet")[1].shape[1] == 256  # 64 px, f4
    steps = ["--dallebart-steps", "2", "--dallebart-batch", "4", "--log-every", "1"]
    assert cli.main(["dallebart", *base, "--init-from", "embedded", *steps]) == 0
    model, params = DalleBart.from_pretrained(run / "dallebart" / "model")
    embedded, embedded_params = DalleBart.from_pretrained("embedded")
    assert model.config.to_dict() == embedded.config.to_dict()
    tuned = params["lm_head"]["kernel"]
    assert tuned.shape == embedded_params["lm_head"]["kernel"].shape
    assert not np.allclose(tuned, embedded_params["lm_head"]["kernel"])  # it trained
    vqgan_config = json.loads((run / "vqgan" / "model" / "config.json").read_text())
    assert vqgan_config["n_embed"] == VQModel.from_pretrained("embedded")[0].config.n_embed
    # and the embedded CLIP fine-tunes on them
    steps = ["--clip-steps", "2", "--clip-batch", "4", "--log-every", "1"]
    assert cli.main(["clip", *base, "--clip-init", "embedded", *steps]) == 0
    tuned, embedded = (
        CLIPScorer.from_pretrained(folder) for folder in (run / "clip" / "model", "embedded")
    )
    assert tuned.config == embedded.config
    assert not np.allclose(tuned.params["text_projection"], embedded.params["text_projection"])
    small = tmp_path / "small"
    assert cli.main(["world", "--images", str(folder), "--workdir", str(small), "--tiny"]) == 0
    assert cli.main(["clip", "--workdir", str(small), "--clip-init", "embedded", *steps]) == 2
    assert "sees 64-px images and this run's are 32 px" in capsys.readouterr().err
