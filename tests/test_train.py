"""The training pipeline: each trainer learns at toy size, runs resume, data keeps its format."""

import argparse
import collections
import dataclasses
import json
import os
import random
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dalle_mini.models.dallebart import DalleBart
from dalle_mini.models.vqgan import VQModel
from dalle_mini.processor import DalleBartProcessor, train_tokenizer
from dalle_mini.train import cli, common, train_clip, train_dallebart, train_vqgan, world
from dalle_mini.train.data import TextBatcher, read_encoded, write_encoded


def _metrics(workdir):
    lines = (workdir / common.METRICS_NAME).read_text().splitlines()
    return [json.loads(line) for line in lines]


def _losses(workdir):
    return [metrics["loss"] for metrics in _metrics(workdir)]


def _world_images(count, size=32, split="train"):
    examples = [world.example(0, split, i, size) for i in range(count)]
    return np.stack([e[0] for e in examples]), [e[1] for e in examples]


# --- common: optimizer, checkpoints, resume ----------------------------------------------------


def _regression_run(workdir, num_steps, optimizer_config):
    """A linear regression trained by run_steps: cheap to compile, exact to compare."""
    optimizer = common.make_optimizer(optimizer_config, 8)
    x = np.random.default_rng(0).normal(size=(64, 3)).astype(np.float32)
    y = x @ np.array([1.0, -2.0, 0.5], np.float32)

    @jax.jit
    def step(state, batch, rng):
        def loss_fn(w):
            return jnp.mean((batch["x"] @ w - batch["y"]) ** 2)

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        return common.apply_gradients(state, grads, optimizer), {"loss": loss}

    def batches(start):
        for indices in common.batch_order(64, 16, 0, start):
            yield {"x": x[indices], "y": y[indices]}

    state = common.create_state(jnp.zeros(3), optimizer)
    return common.run_steps(
        state, step, batches, num_steps, workdir, {}, name="test", log_every=1, checkpoint_every=2
    )


@pytest.mark.parametrize("name", ["adamw", "adafactor"])
def test_resumed_run_matches_an_uninterrupted_one(tmp_path, name):
    config = common.OptimizerConfig(name=name, learning_rate=0.5, warmup_steps=1, grad_clip=None)
    straight = _regression_run(tmp_path / "straight", 8, config)
    _regression_run(tmp_path / "resumed", 4, config)  # "interrupted" after 4 steps
    assert json.loads((tmp_path / "resumed" / common.CHECKPOINT_INFO_NAME).read_text())["step"] == 4
    resumed = _regression_run(tmp_path / "resumed", 8, config)
    assert int(resumed.step) == 8
    np.testing.assert_allclose(resumed.params, straight.params, rtol=1e-6)
    losses = _losses(tmp_path / "straight")
    assert losses[-1] < 0.5 * losses[0]
    assert not list(tmp_path.rglob("*.pkl")) and not list(tmp_path.rglob("*.pickle"))


def test_gradient_accumulation_updates_every_k_steps():
    optimizer = common.make_optimizer(
        common.OptimizerConfig(learning_rate=0.1, warmup_steps=0, accumulation_steps=3), 4
    )
    state = common.create_state(jnp.ones(2), optimizer)
    for expected_changed in (False, False, True):
        new = common.apply_gradients(state, jnp.ones(2), optimizer)
        assert bool(jnp.any(new.params != state.params)) == expected_changed
        state = new


def test_schedule_warms_up_then_decays():
    schedule = common.learning_rate_schedule(
        common.OptimizerConfig(learning_rate=1.0, warmup_steps=10), 100
    )
    assert schedule(0) == 0.0 and schedule(5) == pytest.approx(0.5)
    assert schedule(10) == pytest.approx(1.0) and schedule(99) < 0.1


def test_a_checkpoint_of_another_model_is_refused_clearly(tmp_path):
    optimizer = common.make_optimizer(common.OptimizerConfig(), 4)
    common.save_checkpoint(tmp_path, common.create_state(jnp.zeros(3), optimizer), {})
    with pytest.raises(ValueError, match="does not match"):
        common.load_checkpoint(tmp_path, common.create_state({"w": jnp.zeros((2, 2))}, optimizer))


# --- data -------------------------------------------------------------------------------------


def _processor(captions):
    return DalleBartProcessor(train_tokenizer(captions, 300), 24, normalizer=None)


def test_parquet_round_trip_and_caption_blanking(tmp_path):
    captions = [f"a red circle number {i}" for i in range(200)]
    codes = np.arange(200 * 4).reshape(200, 4) % 7
    write_encoded(tmp_path / "part.parquet", captions, codes)
    read_captions, read_codes = read_encoded(tmp_path)
    assert read_captions == captions and np.array_equal(read_codes, codes)
    batcher = TextBatcher(_processor(captions), read_captions, read_codes, blank_rate=0.1)
    batches = batcher.batches(100, seed=0)
    blanked = [
        np.all(b["input_ids"] == batcher.uncond_ids, axis=1).mean()
        for b in (next(batches) for _ in range(10))
    ]
    assert 0.05 < np.mean(blanked) < 0.15
    with pytest.raises(ValueError, match="lacks column"):
        pq.write_table(
            pq.read_table(tmp_path / "part.parquet").drop(["encoding"]), tmp_path / "bad.parquet"
        )
        read_encoded(tmp_path / "bad.parquet")


def test_alternate_captions_are_served_at_their_rate_and_blanking_still_applies():
    captions = [f"a red circle number {i}" for i in range(200)]
    alternates = [f"a red shape number {i}" for i in range(200)]
    processor, codes = _processor(captions + alternates), np.repeat(np.arange(200)[:, None], 4, 1)
    plain = TextBatcher(processor, captions, codes, blank_rate=0.1)
    ids = {row.tobytes(): i for i, row in enumerate(plain.input_ids)}
    alternate_ids = {row.tobytes(): i for i, row in enumerate(processor(alternates)["input_ids"])}
    for rate in (0.0, 0.3, 1.0):
        batcher = TextBatcher(processor, captions, codes, 0.1, alternates, alternate_rate=rate)
        served = {"caption": 0, "alternate": 0, "blank": 0}
        for batch, before in zip(batcher.batches(100, 0), plain.batches(100, 0), strict=False):
            assert np.array_equal(batch["codes"], before["codes"])
            for row, code_row in zip(batch["input_ids"], batch["codes"], strict=True):
                index = int(code_row[0])  # image i's codes are all i
                if np.array_equal(row, batcher.uncond_ids[0]):
                    served["blank"] += 1
                elif row.tobytes() in alternate_ids:
                    assert alternate_ids[row.tobytes()] == index  # its own image's alternate
                    served["alternate"] += 1
                else:
                    assert ids[row.tobytes()] == index
                    served["caption"] += 1
            if sum(served.values()) >= 2000:
                break
        share = served["alternate"] / (served["alternate"] + served["caption"])
        assert abs(share - rate) < 0.05, (rate, served)
        assert 0.07 < served["blank"] / 2000 < 0.13
    with pytest.raises(ValueError, match="one alternate caption per caption: 3 for 200"):
        TextBatcher(processor, captions, codes, 0.1, alternates[:3], 0.3)
    with pytest.raises(ValueError, match="needs alternate captions"):
        TextBatcher(processor, captions, codes, 0.1, None, 0.3)


# --- the trainers -----------------------------------------------------------------------------


def _small_vqgan_config(**overrides) -> train_vqgan.VQGANTrainConfig:
    """24 steps of a small VQGAN on 32 px world images."""
    model = dataclasses.replace(
        train_vqgan.embedded_config(32), ch_mult=(1, 1), z_channels=8, n_embed=32, embed_dim=4
    )
    settings = dict(
        model=model,
        optimizer=common.OptimizerConfig(learning_rate=3e-3, warmup_steps=2),
        num_steps=24,
        batch_size=8,
        restart_every=4,
        log_every=4,
        checkpoint_every=24,
    )
    return train_vqgan.VQGANTrainConfig(**{**settings, **overrides})


def test_vqgan_trainer_loss_falls_and_codebook_is_used(tmp_path):
    images, _ = _world_images(64)
    vqgan, params = train_vqgan.train(images, _small_vqgan_config(), tmp_path)
    losses = _losses(tmp_path)
    assert losses[-1] < 0.6 * losses[0]
    codes = train_vqgan.encode_images(vqgan, params, images)
    assert np.unique(codes).size > 0.3 * 32  # k-means start + restarts: no collapse onto few codes


def test_vqgan_crops_hold_an_object_and_keep_the_code_grid():
    scene = world.parse_caption("a small red star at the bottom right on a gray background")
    image = np.asarray(world.render(scene, 64)).astype(np.int32)
    rows, columns = np.mgrid[:64, :64]
    image[..., 2] += 4 * (rows % 4) + columns % 4  # a watermark below the foreground threshold
    images = np.repeat(image.astype(np.uint8)[None], 40, axis=0)
    crops = train_vqgan.object_crops(images, 32, 4, np.random.default_rng(0))
    assert crops.shape == (40, 32, 32, 3)
    red = np.all(np.abs(crops.astype(int) - world.COLORS["red"]) < 30, axis=-1)  # (40, 32, 32)
    assert red.any(axis=(1, 2)).all()  # every crop shows the object
    gray = np.asarray(world.COLORS["gray"])
    assert np.all(crops[:, 0, 0, 2].astype(int) - gray[2] == 0)  # each starts on the code grid
    windows = {crop.tobytes() for crop in crops}
    assert len(windows) > 1  # jittered around the object, not one fixed window
    blank = np.full((3, 64, 64, 3), 200, np.uint8)  # no object: a window anywhere
    assert train_vqgan.object_crops(blank, 16, 4, np.random.default_rng(0)).shape == (3, 16, 16, 3)
    with pytest.raises(ValueError, match="multiple of the downsampling 4"):
        train_vqgan.object_crops(images, 30, 4, np.random.default_rng(0))
    with pytest.raises(ValueError, match="at most the image size 64"):
        train_vqgan.object_crops(images, 128, 4, np.random.default_rng(0))


def test_vqgan_trained_on_crops_reconstructs_whole_images(tmp_path):
    images, _ = _world_images(64)
    config = _small_vqgan_config(batch_size=16, crop_size=16)
    vqgan, params = train_vqgan.train(images, config, tmp_path)
    losses = _losses(tmp_path)
    assert losses[-1] < 0.6 * losses[0]
    untrained = VQModel(config.model).init_params(jax.random.PRNGKey(0))
    error = {}
    for name, weights in (("trained", params), ("untrained", untrained)):
        codes = train_vqgan.encode_images(vqgan, weights, images)  # whole 32 px images
        error[name] = np.mean(
            (train_vqgan.decode_codes(vqgan, weights, codes) / 255 - images / 255) ** 2
        )
    assert error["trained"] < 0.5 * error["untrained"]
    with pytest.raises(ValueError, match="crop size 15"):
        train_vqgan.train(images, dataclasses.replace(config, crop_size=15), tmp_path / "bad")


def test_code_costs_trade_a_little_distance_for_commoner_codes():
    images, _ = _world_images(48)
    config = dataclasses.replace(
        train_vqgan.embedded_config(32), ch_mult=(1, 1), z_channels=8, n_embed=64, embed_dim=4
    )
    vqgan = VQModel(config)
    params = vqgan.init_params(jax.random.PRNGKey(1))
    nearest = train_vqgan.encode_images(vqgan, params, images)
    off = train_vqgan.code_costs(vqgan, params, images, rate=0.0)
    assert not off.costs.any()  # rate 0: the original nearest-code encoding, to the bit
    np.testing.assert_array_equal(
        train_vqgan.encode_images(vqgan, params, images, code_costs=off.costs), nearest
    )
    found = train_vqgan.code_costs(vqgan, params, images, rate=4.0, sample=32)
    assert found.entropy_costed < found.entropy_nearest - 0.1
    assert found.used_costed < found.used_nearest
    costed = train_vqgan.encode_images(vqgan, params, images, code_costs=found.costs)
    # each latent's choice is the best of distance + cost: never worse than its nearest code
    z = np.asarray(vqgan.latents(images.astype(np.float32) / 255.0, params)).reshape(-1, 4)
    book = np.asarray(params["quantize"]["embedding"]["embedding"])
    distance = lambda codes: np.sum((z - book[codes.ravel()]) ** 2, axis=-1)  # noqa: E731
    total = lambda codes: distance(codes) + found.costs[codes.ravel()]  # noqa: E731
    assert np.all(total(costed) <= total(nearest) + 1e-4)
    assert np.mean(costed != nearest) > 0.05
    with pytest.raises(ValueError, match=r"one float per code, shape \(64,\)"):
        vqgan.encode(images[:1].astype(np.float32) / 255.0, params, code_costs=np.zeros(8))


def _grid_distance_to_most_similar(table, side):
    """For each position, the row + column distance to the position whose embedding is most like
    its own (cosine)."""
    unit = table / np.linalg.norm(table, axis=1, keepdims=True)
    similarity = unit @ unit.T
    np.fill_diagonal(similarity, -2.0)
    nearest, position = similarity.argmax(axis=1), np.arange(len(table))
    return np.abs(nearest // side - position // side) + np.abs(nearest % side - position % side)


def test_a_new_dallebart_starts_knowing_each_codes_row_and_column(tmp_path):
    """The decoder's position table starts as row/column waves: every code's most similar
    position is a neighbour in the image (a random table: almost never), at the init's scale;
    `grid_positions=False` keeps the original random init."""
    table = common.grid_positions(256, 128, 0.02)
    assert table.shape == (256, 128) and table.std() == pytest.approx(0.02, rel=1e-3)
    assert np.all(_grid_distance_to_most_similar(table, 16) == 1)
    random_table = np.random.default_rng(0).normal(size=(256, 128))
    assert np.mean(_grid_distance_to_most_similar(random_table, 16) == 1) < 0.1

    captions = [f"a {c} square" for c in ("red", "blue")] * 8
    codes = np.zeros((16, 16), np.int32)
    processor = _processor(captions)
    model_config = dataclasses.replace(
        train_dallebart.embedded_config(processor.tokenizer.get_vocab_size(), 8, 16, 24),
        d_model=32,
        decoder_ffn_dim=32,
    )
    for grid, workdir in ((True, tmp_path / "grid"), (False, tmp_path / "random")):
        config = train_dallebart.DalleBartTrainConfig(
            num_steps=1, batch_size=4, grid_positions=grid, checkpoint_every=1
        )
        _, params, _ = train_dallebart.train(
            captions, codes, 8, config, workdir, processor, model_config
        )
        start = params["model"]["decoder"]["embed_positions"]["embedding"]
        near = np.mean(_grid_distance_to_most_similar(np.asarray(start), 4) == 1)
        assert near == 1.0 if grid else near < 0.6


def test_a_new_clip_image_tower_starts_knowing_each_patchs_row_and_column():
    model = train_clip.embedded_config(64)  # 8 × 8 patches
    model = dataclasses.replace(
        model,
        vision=dataclasses.replace(model.vision, width=32, layers=1),
        text=dataclasses.replace(model.text, width=32, heads=1, layers=1),
    )
    grid = train_clip.new_params(train_clip.CLIPTrainConfig(model=model))
    plain = train_clip.new_params(train_clip.CLIPTrainConfig(model=model, grid_positions=False))
    table = np.asarray(grid["visual"]["positional_embedding"])
    random_table = np.asarray(plain["visual"]["positional_embedding"])
    assert np.all(_grid_distance_to_most_similar(table[1:], 8) == 1)
    assert np.mean(_grid_distance_to_most_similar(random_table[1:], 8) == 1) < 0.5
    np.testing.assert_array_equal(table[0], random_table[0])  # the class token's row: as init
    # about as large as the patch embeddings it is added to (world images at init), so that
    # after ln_pre each token still says where it is; the random table is far smaller
    images, _ = _world_images(16, size=64)
    kernel = grid["visual"]["conv1"]["kernel"]
    patches = jax.lax.conv_general_dilated(
        jnp.asarray(train_clip.pixels_for_clip(images)), kernel, (8, 8), "VALID",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )  # fmt: skip
    patch_rms = float(jnp.sqrt(jnp.mean(patches**2)))
    assert 0.5 < np.sqrt(np.mean(table[1:] ** 2)) / patch_rms < 2
    assert np.sqrt(np.mean(random_table[1:] ** 2)) / patch_rms < 0.25


def test_dallebart_trainer_loss_falls_and_saves_a_loadable_checkpoint(tmp_path):
    from dalle_mini.models.dallebart import DalleBart

    rng = np.random.default_rng(0)
    colors = ["red", "blue", "green", "yellow"]
    captions = [f"a {colors[i % 4]} square" for i in range(64)]
    codes = np.array([np.full(8, i % 4) + rng.integers(0, 2, 8) * 4 for i in range(64)], np.int32)
    processor = _processor(captions)
    model_config = dataclasses.replace(
        train_dallebart.embedded_config(processor.tokenizer.get_vocab_size(), 8, 8, 24),
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
    )
    config = train_dallebart.DalleBartTrainConfig(
        optimizer=common.OptimizerConfig(learning_rate=1e-2, warmup_steps=2, accumulation_steps=2),
        num_steps=30,
        batch_size=16,
        log_every=5,
        checkpoint_every=10,
    )
    model, params, processor = train_dallebart.train(
        captions, codes, 8, config, tmp_path, processor, model_config
    )
    losses = _losses(tmp_path)
    assert losses[0] > 1.8 and losses[-1] < 0.8 * losses[0]  # log(8) = 2.08 at the start
    train_dallebart.save(tmp_path / "model", model, params, processor)
    loaded, loaded_params = DalleBart.from_pretrained(tmp_path / "model")
    assert loaded.config == model.config
    np.testing.assert_array_equal(loaded_params["lm_head"]["kernel"], params["lm_head"]["kernel"])
    assert DalleBartProcessor.from_pretrained(tmp_path / "model")("a red square")[
        "input_ids"
    ].shape == (1, 24)


def test_hard_negatives_change_one_stated_thing_and_avoid_held_out_pairs():
    scenes = [world.example(0, split, i)[2] for split in ("train", "heldout") for i in range(150)]
    rng = random.Random(0)
    changed = collections.Counter()
    for scene in scenes:
        wrong = train_clip.counterfactual(scene, rng)
        world.validate_scene(wrong)
        truth = scene.request()
        assert wrong != truth
        changed["background"] += wrong.background != truth.background
        changed["relation"] += wrong.relation != truth.relation
        for new, old in zip(wrong.objects, truth.objects, strict=True):
            for attribute in ("color", "kind", "size", "position"):
                changed[attribute] += getattr(new, attribute) != getattr(old, attribute)
            if (new.color, new.kind) != (old.color, old.kind):
                assert (new.color, new.kind) not in world.HELD_OUT_PAIRS
    # every kind of change occurs
    assert set(changed) == {"background", "relation", "color", "kind", "size", "position"}
    assert all(changed.values())
    texts = train_clip.hard_negative_captions(scenes[:20], 2, seed=0)
    assert all(len(pair) == 2 for pair in texts)
    assert all(
        world.parse_caption(t).request() != s.request()
        for s, pair in zip(scenes[:20], texts, strict=True)
        for t in pair
    )


def test_miscounted_drawings_hold_one_object_too_many_or_too_few_and_the_checker_sees_it():
    from dalle_mini.train import scene_check

    scenes = [world.example(0, "train", i)[2] for i in range(120)]
    rng = random.Random(0)
    changes = collections.Counter()
    for scene in scenes:
        placed = train_clip.miscounted(scene, rng)
        assert abs(len(placed) - len(scene.objects)) == 1
        drawn = list(zip(scene.objects, scene.layout, strict=True))
        assert all(pair in drawn for pair in placed[: len(drawn)])  # the scene's own, kept
        cells = [world.position_at(x, y) for _, (x, y) in placed]
        assert len(set(cells)) == len(cells)  # every object in its own cell
        assert all((obj.color, obj.kind) not in world.HELD_OUT_PAIRS for obj, _ in placed)
        assert all(obj.color != scene.background for obj, _ in placed)
        drawing = world.draw_objects(scene.background, placed)
        assert len(scene_check.read_image(drawing).objects) == len(placed)
        if len(placed) < len(scene.objects):
            changes["removed"] += 1
        else:
            changes["copied" if placed[-1][0] in scene.objects else "new"] += 1
    assert set(changes) == {"removed", "copied", "new"} and min(changes.values()) >= 10
    images = train_clip.miscounted_images(scenes[:3], seed=0, size=32)
    assert images.shape == (3, 32, 32, 3) and images.dtype == np.uint8
    with pytest.raises(ValueError, match="layout"):
        train_clip.miscounted(scenes[0].request(), rng)


def test_clip_trainer_loss_falls_and_saves_open_clip_format(tmp_path):
    from dalle_mini.scoring import CLIPScorer

    examples = [world.example(0, "train", i, 32) for i in range(64)]
    images = np.stack([e[0] for e in examples])
    captions, scenes = [e[1] for e in examples], [e[2] for e in examples]
    model = train_clip.embedded_config(32)
    model = dataclasses.replace(
        model,
        embed_dim=16,
        vision=dataclasses.replace(model.vision, width=32, layers=1),
        text=dataclasses.replace(model.text, width=32, heads=1, layers=1, context_length=24),
    )
    config = train_clip.CLIPTrainConfig(
        model=model,
        optimizer=common.OptimizerConfig(learning_rate=3e-3, warmup_steps=2),
        num_steps=20,
        batch_size=16,
        miscount_fraction=0.5,
        log_every=5,
        checkpoint_every=20,
    )
    # hard negatives on: wrong captions, and half of each batch's images drawn miscounted
    scorer, _ = train_clip.train(images, captions, config, tmp_path, scenes)
    losses = _losses(tmp_path)
    assert losses[-1] < 0.8 * losses[0]
    assert all(0 <= m["count_accuracy"] <= 1 for m in _metrics(tmp_path))
    scorer.save_pretrained(tmp_path / "model")
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == [
        "open_clip_config.json",
        "open_clip_model.safetensors",
    ]
    loaded = CLIPScorer.from_pretrained(tmp_path / "model")
    np.testing.assert_allclose(
        loaded.score(captions[0], images[:4]), scorer.score(captions[0], images[:4]), rtol=1e-5
    )


def test_clip_sees_the_vqgans_reconstructions_in_place_of_the_softened_images(tmp_path, capsys):
    images = np.stack([world.example(0, "train", i, 32)[0] for i in range(40)])
    reconstructions = 255 - images
    asked = []

    def reconstruct(indices):
        asked.append(indices)
        return reconstructions[indices]

    shown = train_clip.soften(images, 0.5, 3, reconstruct)
    replaced = np.all(shown == reconstructions, axis=(1, 2, 3))
    assert 10 < replaced.sum() < 30  # about half, chosen by the seed
    np.testing.assert_array_equal(asked[0], np.flatnonzero(replaced))  # only those decoded
    np.testing.assert_array_equal(shown[~replaced], images[~replaced])
    synthetic = train_clip.soften(images, 0.5, 3)  # same images chosen, softened instead
    assert np.all(np.any(synthetic[replaced] != images[replaced], axis=(1, 2, 3)))
    np.testing.assert_array_equal(synthetic[~replaced], images[~replaced])

    # the clip stage decodes the workdir's codes, and says what to run when there are none
    world.write_dataset(tmp_path / "world", 4, 4, 4, size=32)
    assert cli.main(["clip", "--workdir", str(tmp_path), "--image-size", "32", "--tiny"]) == 2
    assert "--clip-views synthetic" in capsys.readouterr().err


def test_encode_stage_writes_the_original_parquet_format(tmp_path, capsys):
    world.write_dataset(tmp_path / "world", 4, 4, 4, size=32)  # one batch shape
    config = dataclasses.replace(
        train_vqgan.embedded_config(32), ch_mult=(1, 1, 1), z_channels=8, n_embed=16, embed_dim=4
    )
    vqgan = VQModel(config)
    vqgan.save_pretrained(tmp_path / "vqgan", vqgan.init_params(jax.random.PRNGKey(0)))
    assert cli.main(["encode", "--workdir", str(tmp_path), "--vqgan", str(tmp_path / "vqgan")]) == 0
    table = pq.read_table(tmp_path / "encoded" / "train.parquet")
    assert table.column_names == ["caption", "encoding"]
    assert str(table.schema.field("caption").type) == "string"
    assert pa.types.is_list(table.schema.field("encoding").type)
    assert table.schema.field("encoding").type.value_type == pa.int64()
    _, captions, _ = world.load_split(tmp_path / "world", "train")
    assert table.column("caption").to_pylist() == captions
    encodings = table.column("encoding").to_pylist()
    assert all(len(row) == 64 and min(row) >= 0 and max(row) < 16 for row in encodings)  # 8×8 grid
    report = json.loads((tmp_path / "encoded" / "report.json").read_text())
    assert report["code_rate"] == cli.CODE_RATE > 0  # commoner codes by default
    assert report["entropy_costed"] <= report["entropy_nearest"]
    argv = ["encode", "--workdir", str(tmp_path), "--vqgan", str(tmp_path / "vqgan")]
    assert cli.main([*argv, "--code-rate", "-1"]) == 2
    assert "--code-rate -1: must be 0 (nearest codes) or more" in capsys.readouterr().err
    # the clip stage shows its images as the VQGAN that made these codes decodes them
    argv = ["clip", "--workdir", str(tmp_path), "--vqgan", str(tmp_path / "vqgan"), "--tiny"]
    argv += ["--image-size", "32", "--clip-steps", "2", "--clip-batch", "4"]
    assert cli.main([*argv, "--clip-miscount", "1.5"]) == 2
    assert "miscount fraction 1.5: must be in [0, 1]" in capsys.readouterr().err
    assert cli.main([*argv, "--clip-miscount", "0.5"]) == 0
    # and so are the miscounted drawings, which have no codes of their own
    assert re.search(
        r"encoding and decoding \d+ wrong drawings with the VQGAN", capsys.readouterr().out
    )
    assert (tmp_path / "clip" / "model" / "open_clip_model.safetensors").is_file()


def test_dallebart_stage_trains_on_captions_naming_every_drawn_cell(tmp_path):
    world.write_dataset(tmp_path / "world", 60, 1, 1, size=32)
    _, captions, scenes = world.load_split(tmp_path / "world", "train")
    args = argparse.Namespace(workdir=str(tmp_path), seed=0, cell_captions=True)
    renamed, partial = cli._world_training_captions(args, captions, 0.3)
    changed = [i for i, (old, new) in enumerate(zip(captions, renamed, strict=True)) if old != new]
    assert len(changed) > 5
    for index, (text, scene) in enumerate(zip(renamed, scenes, strict=True)):
        request = world.parse_caption(text)
        if index in changed:
            assert [o.position for o in request.objects] == [
                world.position_at(*center) for center in scene.layout
            ]
        else:
            assert request == scene.request()  # already naming its cells, or a relation
    # the world's partial captions name the drawn cells too, and only those
    assert len(partial) == len(captions)

    def named_cells(text):
        words = [
            [world._SYNONYMS.get(w, w) for w in part.split()]
            for part in text.replace(",", "").split(" and ")
        ]
        return [world._position_in(part) for part in words]

    for index in changed:
        drawn = [world.position_at(*center) for center in scenes[index].layout]
        assert named_cells(partial[index]) == drawn, partial[index]
    args.cell_captions = False
    assert cli._world_training_captions(args, captions, 0.0) == (captions, None)
    with pytest.raises(ValueError, match="--no-cell-captions"):
        cli._world_training_captions(args, captions[::-1], 0.0)


def test_partial_captions_need_the_world(tmp_path, capsys):
    write_encoded(tmp_path / "own.parquet", ["a cat"] * 4, np.zeros((4, 16), np.int64))
    argv = ["dallebart", "--workdir", str(tmp_path), "--data", str(tmp_path / "own.parquet")]
    assert cli.main([*argv, "--partial-captions", "0.3"]) == 2
    assert "--partial-captions needs the world's scenes" in capsys.readouterr().err
    assert cli.main([*argv, "--partial-captions", "2"]) == 2
    assert "--partial-captions 2: must be in [0, 1]" in capsys.readouterr().err


def test_cli_names_the_missing_input(tmp_path, capsys):
    assert cli.main(["dallebart", "--workdir", str(tmp_path)]) == 2
    assert "encode" in capsys.readouterr().err


def test_evaluation_samples_as_the_app_does_unless_told_otherwise(tmp_path):
    from tiny_pipeline import build_tiny_pipeline

    from dalle_mini.train import evaluate as evaluation

    models = evaluation.Models.load(build_tiny_pipeline(tmp_path / "models"))
    world.write_dataset(tmp_path / "world", 2, 1, 1, size=32)
    own = models.dallebart.config
    config = evaluation.EvalConfig(num_prompts=1, num_candidates=2, keep=1)
    # the model's own top_k and condition scale (config.json), which the app samples with
    report = evaluation.run(models, tmp_path / "world", tmp_path / "eval", config)
    assert (report["config"]["top_k"], report["config"]["condition_scale"]) == (
        own.top_k,
        own.condition_scale,
    )
    told = dataclasses.replace(config, top_k=3, condition_scale=2.0)
    report = evaluation.run(models, tmp_path / "world", tmp_path / "eval", told)
    assert (report["config"]["top_k"], report["config"]["condition_scale"]) == (3, 2.0)
    assert "top_k 3" in (tmp_path / "eval" / "report.md").read_text()


def test_an_evaluation_report_gives_its_own_time_not_an_earlier_evaluations(tmp_path):
    from tiny_pipeline import build_tiny_pipeline

    models = build_tiny_pipeline(tmp_path / "models")
    world.write_dataset(tmp_path / "world", 2, 1, 1, size=32)
    earlier = {"world": 1.5, "vqgan": 20.0, "evaluate": 9999.0, "total": 10020.5}
    (tmp_path / cli.TIMINGS_NAME).write_text(json.dumps(earlier))
    argv = ["evaluate", "--workdir", str(tmp_path), "--models", str(models)]
    argv += ["--eval-prompts", "1", "--eval-candidates", "2", "--eval-keep", "1"]
    assert cli.main(argv) == 0
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["timings_s"] == {"world": 1.5, "vqgan": 20.0, "total": 21.5}
    assert report["evaluate_seconds"] < 9999.0
    assert json.loads((tmp_path / cli.TIMINGS_NAME).read_text())["evaluate"] < 9999.0


def test_all_runs_every_stage_and_installs_three_loadable_models(tmp_path):
    # the tiny preset: every stage of the one command, the DalleBart and CLIP side by side
    out = tmp_path / "models"
    assert cli.main(["all", "--tiny", "--workdir", str(tmp_path / "run"), "--out", str(out)]) == 0
    timings = json.loads((tmp_path / "run" / cli.TIMINGS_NAME).read_text())
    assert set(cli.STAGES) <= set(timings) and timings["total"] > 0
    assert (out / "evaluation_report.json").is_file()
    assert DalleBart.from_pretrained(out / "dallebart")[0].config.image_length == 64
    assert VQModel.from_pretrained(out / "vqgan")[0].config.resolution == 32
    assert (out / "clip" / "open_clip_model.safetensors").is_file()


def test_a_failing_side_by_side_stage_stops_the_run_and_is_named(tmp_path):
    args = cli.build_parser().parse_args(["all", "--tiny", "--workdir", str(tmp_path)])
    cli.tiny_overrides(args)
    with pytest.raises(cli.StageFailed, match="dallebart"):  # nothing encoded to train on
        cli.run_concurrently(args, cli.CONCURRENT_STAGES)
    assert not (tmp_path / cli.TIMINGS_NAME).exists()  # no time recorded for a failed stage


def test_a_stage_stopped_because_the_other_failed_is_not_called_failed(tmp_path):
    # the world is there, so the CLIP (synthetic views) trains; nothing is encoded, so the
    # DalleBart fails at once and the CLIP is stopped
    argv = ["all", "--tiny", "--workdir", str(tmp_path), "--clip-views", "synthetic"]
    args = cli.build_parser().parse_args(argv)
    cli.tiny_overrides(args)
    args.clip_steps = 100_000  # it must still be running when the DalleBart fails
    cli.run_stage(args, "world")
    with pytest.raises(cli.StageFailed) as failure:
        cli.run_concurrently(args, cli.CONCURRENT_STAGES)
    assert str(failure.value).startswith("stage dallebart failed")
    assert "stopped clip beside it" in str(failure.value)


@pytest.mark.skipif(
    not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
    reason="needs Linux and two cores (as CI has) to move threads between them",
)
def test_pin_threads_moves_every_thread_of_a_process_and_gives_the_cores_back():
    # what run_concurrently does to a side-by-side stage: one core while the other stage runs,
    # then all of them; a process with threads of its own stands in for a stage
    starter = "import threading, time\n"
    starter += "[threading.Thread(target=time.sleep, args=(60,)).start() for _ in range(3)]\n"
    starter += "print('ready', flush=True)\ntime.sleep(60)"
    process = subprocess.Popen([sys.executable, "-c", starter], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "ready"
        every = set(os.sched_getaffinity(0))
        one = {min(every)}

        def affinities() -> list[set[int]]:
            tids = os.listdir(f"/proc/{process.pid}/task")
            return [os.sched_getaffinity(int(tid)) for tid in tids]

        assert len(affinities()) == 4
        cli.pin_threads(process.pid, one)
        assert affinities() == [one] * 4
        cli.pin_threads(process.pid, every)
        assert affinities() == [every] * 4
    finally:
        process.kill()
        process.wait()
