"""Background checkpoint writes on a real trainer: the same bytes as inline writes."""

from helpers import assert_bitwise_equal, tiny_cfg, train

import d2persist.training.hook
from d2persist.files.safe_load import safe_torch_load


def train_tiny(folder, *opts):
    return train(tiny_cfg(folder, "SOLVER.MAX_ITER", 4, "SOLVER.CHECKPOINT_PERIOD", 1,
                          "PERSIST.EXPORT", False, *opts))


def _momentum(checkpoint):
    state = checkpoint["trainer"]["_trainer"]["optimizer"]["state"]
    return {i: s["momentum_buffer"] for i, s in state.items()}


def test_background_saves_write_what_inline_saves_write(tmp_path, mocker):
    train_tiny(tmp_path / "inline", "PERSIST.ASYNC", False)
    spy = mocker.spy(d2persist.training.hook, "snapshot_state")
    train_tiny(tmp_path / "background", "PERSIST.ASYNC", True)

    # each save after the first wrote from the first one's buffers, overwritten in place
    snaps = spy.spy_return_list
    assert len(snaps) == 4
    assert {s["model"]["backbone.bottom_up.stem.conv1.weight"].data_ptr() for s in snaps} == {
        snaps[0]["model"]["backbone.bottom_up.stem.conv1.weight"].data_ptr()
    }
    for it in range(4):
        name = f"model_{it:07d}.pth"
        a = safe_torch_load(str(tmp_path / "inline" / name))
        b = safe_torch_load(str(tmp_path / "background" / name))
        assert a["iteration"] == b["iteration"] == it
        assert_bitwise_equal(a["model"], b["model"])
        momentum_a, momentum_b = (_momentum(a), _momentum(b))
        assert momentum_a
        assert_bitwise_equal(momentum_a, momentum_b)
