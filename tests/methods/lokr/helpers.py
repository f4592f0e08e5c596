"""The LoKr tests' helpers: the shared LyCORIS ones, bound to ``LoKrConfig``."""

from __future__ import annotations

from functools import partial

from tests.methods.lycoris_helpers import (  # noqa: F401
    DIRECTION_IDS, DIRECTIONS, HF_TARGETS, HF_TASKS, LIBS, NET_TARGETS, Net, adapter_state, build, fresh_net, inputs,
    load, make_hf, make_net, net_inputs, perturb_trainable, read_config, run, save, saved_shapes, saved_tensors,
)

make_net = partial(make_net, "LoKrConfig", {"r": 1, "alpha": 2})
make_hf = partial(make_hf, "LoKrConfig")
lokr_state = partial(adapter_state, "lokr_")
