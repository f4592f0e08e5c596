"""The LoHa tests' helpers: the shared LyCORIS ones, bound to ``LoHaConfig``."""

from __future__ import annotations

from functools import partial

from tests.methods.lycoris_helpers import (  # noqa: F401
    DIRECTION_IDS, DIRECTIONS, HF_TARGETS, HF_TASKS, LIBS, NET_TARGETS, Net, adapter_state, build, fresh_net, inputs,
    load, make_hf, make_net, net_inputs, perturb_trainable, read_config, run, save, saved_shapes, saved_tensors,
)

make_net = partial(make_net, "LoHaConfig", {"r": 2, "alpha": 3})
make_hf = partial(make_hf, "LoHaConfig")
loha_state = partial(adapter_state, "hada_")
