"""Parity with pyreft (the reference implementation), installed with --no-deps."""

import pytest
import torch

pyreft = pytest.importorskip("pyreft", reason="pyreft is installed by `make setup` (--no-deps)")

from reft_lab.interventions import INTERVENTIONS  # noqa: E402
from reft_lab.methods import attach  # noqa: E402
from reft_lab.methods.reft import intervention_key  # noqa: E402


def _copy_from_pyreft(ours, theirs):
    with torch.no_grad():
        ours.rotation.copy_(theirs.rotate_layer.weight.T)
        ours.W.copy_(theirs.learned_source.weight)
        ours.b.copy_(theirs.learned_source.bias)


def test_loreft_intervention_matches_pyreft():
    torch.manual_seed(0)
    theirs = pyreft.LoreftIntervention(embed_dim=48, low_rank_dimension=5, dtype=torch.float32)
    ours = INTERVENTIONS["loreft"](48, 5, dtype=torch.float32)
    _copy_from_pyreft(ours, theirs)
    h = torch.randn(3, 7, 48)
    torch.testing.assert_close(ours(h), theirs(h), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tied", [False, True])
def test_intervened_tiny_llama_matches_pyreft(tiny, tied):
    layers, first, last, T = [0, 2], 2, 2, 9
    base = tiny("llama").model
    reps = []
    for layer in layers:
        for _ in range(1 if tied else 2):
            reps.append({"layer": layer, "component": "block_output", "low_rank_dimension": 4,
                         "intervention": pyreft.LoreftIntervention(embed_dim=64, low_rank_dimension=4, dtype=torch.float32)})
    theirs = pyreft.get_reft_model(base, pyreft.ReftConfig(representations=reps))
    ours = attach(tiny("llama").model, {"name": "loreft", "rank": 4, "layers": layers,
                                        "positions": f"f{first}+l{last}", "tied": tied})
    pyreft_interventions = list(theirs.interventions.values())
    ours_keys = [intervention_key(layer, g) for layer in layers for g in ours.groups]
    for key, theirs_i in zip(ours_keys, pyreft_interventions):
        _copy_from_pyreft(ours.interventions[key], theirs_i)

    ids = torch.randint(3, 250, (3, T), generator=torch.Generator().manual_seed(2))
    f_pos, l_pos = list(range(first)), list(range(T - last, T))
    if tied:
        locations = [[f_pos + l_pos] * 3 for _ in layers]
    else:
        locations = [[pos] * 3 for _ in layers for pos in (f_pos, l_pos)]
    _, expected = theirs({"input_ids": ids}, unit_locations={"sources->base": (None, locations)})
    got = ours(ids)
    torch.testing.assert_close(got.logits, expected.logits, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got.logits, tiny("llama").model(ids).logits, atol=1e-3), "the edit must matter"
