"""Tiny structural matchers over FX nodes, shared by the fusion passes (each returns the node or None)."""
from __future__ import annotations

import torch

aten = torch.ops.aten
VIEW_OPS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)


def is_op(node, *targets) -> bool:
    return isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target in targets


def op(node, *targets):
    return node if is_op(node, *targets) else None


def only_user(node):
    users = list(node.users) if isinstance(node, torch.fx.Node) else []
    return users[0] if len(users) == 1 else None


def scalar_arg(node, i, value) -> bool:
    return len(node.args) > i and isinstance(node.args[i], (int, float)) and float(node.args[i]) == float(value)


def through_views(node):
    """Follow view/reshape ops back to their source."""
    while is_op(node, *VIEW_OPS):
        node = node.args[0]
    return node


def other_arg(node, known):
    """For a binary op with `known` as one argument, the other argument (or None)."""
    a, b = node.args[0], node.args[1]

    def same(arg):
        return arg is known if isinstance(known, torch.fx.Node) else (not isinstance(arg, torch.fx.Node) and arg == known)

    return b if same(a) else a if same(b) else None
