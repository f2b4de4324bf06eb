"""Supervision trees on Ray with Erlang/OTP semantics. Generic: knows nothing of trading.

    from supervisors import ChildSpec, SupervisorSpec, start_tree
    tree = start_tree(SupervisorSpec(id="root", children=[ChildSpec(id="a", cls="m:A")]))
"""

from ._child import SupervisedContext, current_context
from ._supervisor import StartError
from .placement import PlacementError
from .spec import Backoff, ChildSpec, Placement, SpecError, SupervisorSpec
from .stateful import EventSourced
from .tree import ChildInfo, Tree, TreeError, attach_tree, default_store_url, start_tree

__all__ = [
    "Backoff", "ChildInfo", "ChildSpec", "EventSourced", "Placement", "PlacementError",
    "SpecError", "StartError", "SupervisedContext", "SupervisorSpec", "Tree", "TreeError",
    "attach_tree", "current_context", "default_store_url", "start_tree",
]
