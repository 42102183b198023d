"""Golden values: the numbers a refactor must not move (same seed, same config, 8 CPU devices as in every test).

Training losses of a tiny early-fusion and a tiny mot run, the exported model's logits on a fixed batch, and the
greedy tokens `generate` makes from a fixed prompt, recorded on the CPU machine (jax 0.10.2). A change that moves
any of them changes what users train or get: say so in the commit, and record the new values here."""

import json

import numpy as np
import pytest

from omni.tools import export
from omni.tools import generate as generate_lib
from omni.train import artifact, loop
from tests.conftest import tiny_config

RUNS = {"early": {}, "mot": {"model.fusion": "mot"}}
GOLDEN = {'early': {'losses': {'5': 5.52090311050415,
                      '10': 4.097437381744385,
                      '15': 3.2490785121917725,
                      '20': 3.081482172012329},
           'logits_sum': -1281.906494140625,
           'logits_abs_sum': 7350.0068359375,
           'logits_first': [-1.7955467700958252, -0.15745839476585388, 0.07272357493638992, -0.049018651247024536],
           'logits_last': [-1.951041579246521, 1.168798565864563, 1.793667197227478, 0.8087485432624817],
           'tokens': [131, 48, 114, 127, 132]},
 'mot': {'losses': {'5': 5.31735897064209,
                    '10': 3.713945150375366,
                    '15': 2.895055055618286,
                    '20': 2.79634952545166},
         'logits_sum': -1525.35888671875,
         'logits_abs_sum': 7283.67236328125,
         'logits_first': [-1.8582348823547363, 1.2440868616104126, 0.037782032042741776, 1.8520262241363525],
         'logits_last': [-1.5082800388336182, 1.8247305154800415, 0.8482207655906677, 0.5461139678955078],
         'tokens': [48, 114, 127, 132, 117, 48, 114, 127, 132, 117, 48, 114]}}


def _train(tmp_path_factory, fusion):
    from omni import config as config_lib

    cfg = config_lib.apply_overrides(tiny_config(), [f"{k}={v}" for k, v in RUNS[fusion].items()])
    workdir = tmp_path_factory.mktemp(f"golden-{fusion}") / "run"
    loop.train(cfg, workdir, progress=False)
    losses = {row["step"]: row["loss"] for row in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())
              if "loss" in row}
    return cfg, workdir, losses


@pytest.fixture(scope="module", params=sorted(RUNS))
def trained(request, tmp_path_factory):
    return request.param, *_train(tmp_path_factory, request.param)


def _fixed_prompt(model):
    prompt = generate_lib.prompt_arrays([{"text": "a red circle at the top"}], model.vocab, model.tokenizer,
                                        model.config.data.patch_size, model.config.data.audio_layout, "text")
    return prompt


def _summary(trained, tmp_path):
    fusion, cfg, workdir, losses = trained
    out = export.export(workdir, tmp_path / "export", dtype="float32")
    model = artifact.load(out)
    prompt = _fixed_prompt(model)
    batch = generate_lib.prompt_batch([prompt], 1, len(prompt["tokens"]))
    from flax import nnx

    logits = np.asarray(nnx.merge(model.graphdef, model.params)(batch))[0, :len(prompt["tokens"])]
    result = generate_lib.generate(model.graphdef, model.params, cfg.model, model.vocab, [prompt], target="text",
                                   max_new_tokens=12, audio_layout=cfg.data.audio_layout)
    return {"losses": {str(k): v for k, v in sorted(losses.items())},
            "logits_sum": float(logits.sum()), "logits_abs_sum": float(np.abs(logits).sum()),
            "logits_first": [float(x) for x in logits[0, :4]], "logits_last": [float(x) for x in logits[-1, :4]],
            "tokens": [int(t) for t in result.tokens[0]]}


def test_losses_exported_logits_and_greedy_tokens_are_the_recorded_ones(trained, tmp_path):
    got, want = _summary(trained, tmp_path), GOLDEN[trained[0]]
    print("GOLDEN", trained[0], json.dumps(got))  # (-s shows the values to record after an intended change)
    assert got["tokens"] == want["tokens"]
    np.testing.assert_allclose([got["losses"][k] for k in sorted(want["losses"])],
                               [want["losses"][k] for k in sorted(want["losses"])], rtol=1e-5)
    for key in ("logits_sum", "logits_abs_sum", "logits_first", "logits_last"):
        np.testing.assert_allclose(got[key], want[key], rtol=1e-4, atol=1e-4, err_msg=key)
