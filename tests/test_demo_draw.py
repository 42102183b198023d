"""The draw demo: text -> image examples, the image tokenizer fitted at corpus build time, and its scorer."""

import numpy as np
import pytest
from flax import nnx

from omni.data import pipeline
from omni.demo import corpus, draw, scorer
from omni.tools.generate import task_of
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def cfg():
    cfg = tiny_config()
    cfg.data.dataset = "demo-draw"
    cfg.demo.train_examples, cfg.demo.eval_examples, cfg.demo.scored_examples = 60, 8, 4
    return cfg


def test_scene_attributes_read_the_colour_and_place_of_drawn_scenes():
    rng = np.random.default_rng(3)
    for _ in range(30):
        example = draw.make_example(rng, 32)
        found = draw.scene_attributes(example["segments"][1]["image"])
        assert found == {"colour": example["meta"]["colour"], "place": example["meta"]["place"]}
    assert draw.scene_attributes(np.full((32, 32, 3), 40, np.uint8)) == {"colour": None, "place": None}


def test_the_corpus_is_built_with_its_own_image_tokenizer_and_held_out_prompts_are_image_tasks(cfg):
    dataset = pipeline.dataset_for(cfg)
    assert dataset.meta["image_tokenizer"]["name"] == "patch-rvq-v1" and dataset.meta["codec"] is None
    assert dataset.meta["image_tokenizer"]["image_size"] == [32, 32]
    assert pipeline.vocab_for(cfg).image_codebook_sizes == (64, 64)
    tasks = [task_of(e) for e in pipeline.examples(cfg, "eval")]
    assert len(tasks) == 8 and all(t.target == "image" and t.group == "draw" for t in tasks)
    task = tasks[0]
    assert task.truth.shape == (4, 4, 2) and (task.image_grid.rows, task.image_grid.cols) == (4, 4)
    assert task.segments[0]["text"] == f"draw {task.meta['answer']}"
    assert task.meta["colour"] in corpus.COLOURS and task.meta["place"] in corpus.PLACES


def test_the_scorer_draws_held_out_prompts_and_reads_them(cfg):
    from omni.train.step import build_model

    model = build_model(cfg, pipeline.vocab_for(cfg))  # untrained: its drawings are anything, but they decode
    graphdef, params = nnx.split(model, nnx.Param)
    lines = []
    scores = scorer.run(cfg, graphdef, params, 4, log=lines.append)
    draw_score = scores["draw"]
    assert draw_score["n"] == 4 and 0 <= draw_score["colour"] <= 1 and 0 <= draw_score["place"] <= 1
    assert draw_score["truth_colour"] == 1.0 and draw_score["truth_place"] == 1.0
    assert any(line.startswith("demo draw: colour") and "(chance 17%)" in line for line in lines)
