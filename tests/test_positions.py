"""Positions under left/right padding and short prompts; tied vs untied intervention counts."""

import pytest
import torch

from reft_lab.errors import ConfigError
from reft_lab.methods import attach
from reft_lab.positions import PositionSpec, prompt_positions


def _edited(spec, mask, lengths=None):
    p = prompt_positions(PositionSpec.parse(spec), mask, lengths)
    return [sorted(p.index[b][p.valid[b]].tolist()) for b in range(len(mask))]


def test_right_and_left_padding():
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 0, 0], [0, 0, 0, 1, 1, 1, 1, 1]])
    assert _edited("f2+l2", mask) == [[0, 1, 4, 5], [3, 4, 6, 7]]
    assert _edited("f2+l2", mask, torch.tensor([4, 3])) == [[0, 1, 2, 3], [3, 4, 5]]
    assert _edited("l1", mask, torch.tensor([4, 3])) == [[3], [5]]


def test_short_prompts_never_edit_twice_or_edit_padding():
    mask = torch.tensor([[1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 1], [1, 1, 1, 1, 1, 1]])
    assert _edited("f3+l3", mask) == [[0, 1], [5], [0, 1, 2, 3, 4, 5]]
    assert _edited("f3", mask) == [[0, 1], [5], [0, 1, 2]]
    assert _edited("l4", mask) == [[0, 1], [5], [2, 3, 4, 5]]


def test_random_masks_property():
    g = torch.Generator().manual_seed(1)
    for _ in range(50):
        B, T = 4, int(torch.randint(1, 12, (1,), generator=g))
        n_att = torch.randint(1, T + 1, (B,), generator=g)
        left = torch.rand(B, generator=g) < 0.5
        mask = torch.zeros(B, T, dtype=torch.long)
        for b in range(B):
            if left[b]:
                mask[b, T - n_att[b]:] = 1
            else:
                mask[b, : n_att[b]] = 1
        lengths = torch.clamp(torch.randint(1, T + 1, (B,), generator=g), max=n_att)
        rows = _edited("f3+l2", mask, lengths)
        for b, row in enumerate(rows):
            start = int((mask[b] == 0).long().cumprod(0).sum())
            prompt = set(range(start, start + int(lengths[b])))
            assert len(row) == len(set(row)) == min(5, len(prompt))
            assert set(row) <= prompt


@pytest.mark.parametrize("spec", ["", "f", "f0", "l0+f1", "f3+", "3", "f-1", "f2+l2+l3"])
def test_malformed_spec_is_refused(spec):
    with pytest.raises(ConfigError, match="method.positions"):
        PositionSpec.parse(spec)


@pytest.mark.parametrize(
    "positions,tied,per_layer", [("f3+l3", False, 2), ("f3+l3", True, 1), ("f3", False, 1), ("l2", True, 1)]
)
def test_tied_vs_untied_counts(tiny, positions, tied, per_layer):
    tuned = attach(tiny().model, {"name": "loreft", "rank": 2, "layers": [0, 3], "positions": positions, "tied": tied})
    assert len(tuned.interventions) == 2 * per_layer
    assert sum(p.numel() for p in tuned.trainable_state().values()) == 2 * per_layer * (2 * 2 * 64 + 2)


def test_padding_and_unselected_positions_are_untouched(tiny, batch):
    ids, mask, lengths = batch
    captured = {}
    loaded = tiny()
    tuned = attach(loaded.model, {"name": "loreft", "rank": 4, "layers": [1], "positions": "f1+l1"})
    block = tuned.model.model.layers[1]
    # hooks run in registration order: this one sees the edited output (and must return None)
    block.register_forward_hook(lambda m, a, o: captured.update({len(captured): o.detach()}))
    tuned(ids, attention_mask=mask, prompt_lengths=lengths)  # edited
    tuned.model(input_ids=ids, attention_mask=mask)  # the base alone: no positions active
    changed = (captured[0] - captured[1]).abs().amax(-1) > 0
    # row 0: prompt [0, 5) → positions 0 and 4; row 1: left padding 3, prompt [3, 7) → 3 and 6
    assert changed.nonzero().tolist() == [[0, 0], [0, 4], [1, 3], [1, 6]]
