"""``target_parameters``: LoRA on parameter tensors (MoE experts and routers), PEFT's rule.

A target names a parameter by its path's last components (``experts.gate_up_proj``,
``mlp.gate.weight``): it matches every ``<module path>.<parameter>`` equal to it or ending in
``.`` + it, as PEFT's ``LoraConfig(target_parameters=...)`` matches. Two layouts are adapted:

- 3-D fused expert tensors (``MultiLoraExperts``: transformers' Mixtral / Qwen-MoE experts);
- a 2-D weight its module applies with ``F.linear`` (``MultiLoraParamLinear``: routers).

Everything is checked before anything is wrapped, so a refused target leaves the model as it
was; the error is one line naming the parameter, its module and why.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from mlora.adapters.fused_experts import (
    FUSED_PARAMETERS,
    MultiLoraExperts,
    fused_experts_problem,
)
from mlora.adapters.param_linear import MultiLoraParamLinear, linear_use_problem
from mlora.adapters.spec import AdapterHost
from mlora.batching.layout import LayoutContext
from mlora.core.errors import MloraError


@dataclass(frozen=True)
class ParameterTarget:
    """One module whose parameters an adapter adapts."""

    path: str  # the module's path in the model, as PEFT names it (no "base_layer")
    parameters: tuple[str, ...]  # in the module's declaration order
    fused_experts: bool  # True: MultiLoraExperts, else one MultiLoraParamLinear per parameter


def _unwrapped(model: nn.Module) -> dict[str, nn.Module]:
    """Module path -> the model's original module there (a host's base layer stands for it)."""
    modules: dict[str, nn.Module] = {}
    for path, module in model.named_modules():
        if "base_layer" in path.split("."):
            continue
        hosted = isinstance(module, AdapterHost)  # a wrapped layer stands for its base layer
        modules[path] = getattr(module, "base_layer", module) if hosted else module
    return modules


def _matches(key: str, targets: tuple[str, ...]) -> str | None:
    return next((t for t in targets if key == t or key.endswith("." + t)), None)


def targetable_parameters(model: nn.Module) -> list[str]:
    """Short names (``module.parameter``) of the parameters ``target_parameters`` could name:
    3-D tensors and 2-D weights outside linear layers."""
    names = set()
    for path, module in _unwrapped(model).items():
        if isinstance(module, nn.Linear) or not path:
            continue
        for parameter, tensor in module.named_parameters(recurse=False):
            if tensor.dim() in (2, 3):
                names.add(f"{path.rsplit('.', 1)[-1]}.{parameter}")
    return sorted(names)


def plan_parameter_targets(
    model: nn.Module, adapter: str, targets: tuple[str, ...]
) -> list[ParameterTarget]:
    """Which modules' parameters ``targets`` adapt, checked, with nothing changed yet.

    Raises:
        MloraError: a target matches nothing, a linear layer's weight, or a module whose layout
            is not one of the two adapted here (naming the parameter, the module and why).
    """
    where = f"adapter {adapter!r}: target_parameters"
    found: set[str] = set()
    plan: list[ParameterTarget] = []
    for path, module in _unwrapped(model).items():
        chosen = []
        for parameter, _ in module.named_parameters(recurse=False):
            key = f"{path}.{parameter}" if path else parameter
            target = _matches(key, targets)
            if target is None:
                continue
            found.add(target)
            kind = type(module).__name__
            if isinstance(module, nn.Linear):
                leaf = path.rsplit(".", 1)[-1]
                raise MloraError(
                    f"{where}: {key} is the weight of a linear layer ({kind}); "
                    f"name {leaf!r} in target_modules instead"
                )
            chosen.append(parameter)
        if not chosen:
            continue
        if any(p.dim() == 3 for p in module.parameters(recurse=False)):  # an experts module
            problem = fused_experts_problem(module)
            if problem is not None:
                raise MloraError(
                    f"{where}: cannot adapt {path}.{chosen[0]}: {type(module).__name__} is not "
                    f"a fused experts layout mlora computes ({problem})"
                )
            ordered = tuple(p for p in FUSED_PARAMETERS if p in chosen)
            plan.append(ParameterTarget(path, ordered, fused_experts=True))
            continue
        for parameter in chosen:
            problem = linear_use_problem(module, parameter)
            if problem is not None:
                raise MloraError(
                    f"{where}: cannot adapt {path}.{parameter} of {type(module).__name__}: "
                    f"{problem}"
                )
        if len(chosen) > 1:
            raise MloraError(
                f"{where}: {path} ({type(module).__name__}): adapt one 2-D parameter of a module "
                f"at most, got {', '.join(chosen)}"
            )
        plan.append(ParameterTarget(path, tuple(chosen), fused_experts=False))
    missing = [t for t in targets if t not in found]
    if missing:
        available = ", ".join(targetable_parameters(model)) or "none"
        raise MloraError(
            f"{where}: {missing[0]!r} matches no parameter of {type(model).__name__} "
            f"(its expert and router parameters: {available})"
        )
    return plan


def attach_parameter_loras(
    model: nn.Module,
    context: LayoutContext,
    adapter: str,
    plan: list[ParameterTarget],
    r: int,
    scaling: float,
    init: str,
) -> None:
    """Wrap each planned module (once, shared by adapters) and give it ``adapter``'s LoRA."""
    for target in plan:
        host = model.get_submodule(target.path)
        if not isinstance(host, (MultiLoraExperts, MultiLoraParamLinear)):
            parent_path, _, leaf = target.path.rpartition(".")
            parent = model.get_submodule(parent_path) if parent_path else model
            if target.fused_experts:
                host = MultiLoraExperts(host, context)
            else:
                host = MultiLoraParamLinear(host, target.parameters[0], context)
            setattr(parent, leaf, host)
        if isinstance(host, MultiLoraExperts):
            host.add_adapter(adapter, list(target.parameters), r, scaling, init)
        else:
            host.add_adapter(adapter, r, scaling, init)
