"""The API conventions of docs/conventions.md, checked on the API itself.

Every check walks what the package exports (each public module's `__all__`, the classes in it
and their public methods) and derives what it checks from the signatures and annotations: a
new function is held to the conventions without being listed here.
"""

from __future__ import annotations

import ast
import collections.abc
import dataclasses
import importlib
import inspect
import pkgutil
import textwrap
import types
import typing
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

import promptmix
import promptmix.functional as PF

SRC = Path(promptmix.__file__).parent
NONE = type(None)

# --------------------------------------------------------------------------- walking the API


def all_modules() -> list[types.ModuleType]:
    names = [promptmix.__name__] + [
        info.name for info in pkgutil.walk_packages(promptmix.__path__, "promptmix.")
    ]
    return [importlib.import_module(name) for name in sorted(names)]


def public_modules() -> list[types.ModuleType]:
    return [m for m in all_modules() if not any(p.startswith("_") for p in m.__name__.split("."))]


def is_ours(obj: object) -> bool:
    return getattr(obj, "__module__", "").startswith("promptmix")


def public_callables() -> Iterator[tuple[str, Callable[..., object], bool]]:
    """`(qualified name, callable, skip_self)` of every public function, class and method."""
    seen: set[int] = set()
    for module in public_modules():
        for name in module.__all__:
            obj = getattr(module, name)
            if id(obj) in seen or not is_ours(obj):
                continue
            if inspect.isfunction(obj):
                seen.add(id(obj))
                yield f"{obj.__module__}.{name}", obj, False
            elif inspect.isclass(obj):
                seen.add(id(obj))
                if getattr(obj, "_is_protocol", False):
                    continue  # a Protocol describes a type; it is not called
                yield f"{obj.__module__}.{name}", obj, False
                for method_name, method in inspect.getmembers(obj):
                    function = inspect.unwrap(getattr(method, "__func__", method))
                    if method_name.startswith("_") or not inspect.isfunction(function):
                        continue
                    if not is_ours(function):
                        continue  # inherited from torch: torch's convention
                    bound = not isinstance(inspect.getattr_static(obj, method_name), staticmethod)
                    yield f"{obj.__module__}.{name}.{method_name}", function, bound


def parameters_of(
    obj: Callable[..., object], skip_self: bool
) -> list[tuple[inspect.Parameter, object]]:
    """Each parameter with its resolved annotation."""
    target = obj.__init__ if inspect.isclass(obj) else obj  # type: ignore[misc]
    if inspect.isclass(obj) and dataclasses.is_dataclass(obj):
        target = obj.__init__  # type: ignore[misc]
    if inspect.isclass(obj) and issubclass(obj, tuple):  # NamedTuple: its fields
        hints = typing.get_type_hints(obj)
        return [
            (inspect.Parameter(field, inspect.Parameter.POSITIONAL_OR_KEYWORD), hints[field])
            for field in obj._fields  # type: ignore[attr-defined]
        ]
    hints = typing.get_type_hints(target)
    parameters = list(inspect.signature(target).parameters.values())
    if inspect.isclass(obj) or skip_self:
        parameters = parameters[1:]
    return [(p, hints.get(p.name, inspect.Parameter.empty)) for p in parameters]


CALLABLES = list(public_callables())
IDS = [name for name, _, _ in CALLABLES]

# --------------------------------------------------------------------------- what is data


SCALARS = (bool, int, float, str, torch.dtype, torch.device, torch.Generator)


def members(annotation: object) -> list[object]:
    """The alternatives of a union (`X | None` included), or the annotation itself."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return [m for arg in typing.get_args(annotation) for m in members(arg)]
    return [annotation]


def is_scalar(annotation: object) -> bool:
    """A number, flag, name, dtype, device or generator: an option."""
    alternatives = [m for m in members(annotation) if m is not NONE]
    return bool(alternatives) and all(
        typing.get_origin(m) is typing.Literal or m in SCALARS for m in alternatives
    )


def is_data_type(annotation: object) -> bool:
    origin = typing.get_origin(annotation) or annotation
    if inspect.isclass(origin) and issubclass(origin, Tensor):
        return True
    if origin is nn.Module:  # a user's model or learner (a promptmix part is an option)
        return True
    if origin in (collections.abc.Sequence, collections.abc.Iterable, list, tuple):
        args = typing.get_args(annotation)
        return all(arg is int or arg is Ellipsis or is_data(arg) for arg in args)
    if origin is collections.abc.Mapping:
        return is_data(typing.get_args(annotation)[1])
    return False


def is_data(annotation: object) -> bool:
    """Tensors, a user's modules, and sequences or mappings of them: what a call computes on."""
    alternatives = [m for m in members(annotation) if m is not NONE]
    return bool(alternatives) and all(is_data_type(m) for m in alternatives)


def test_the_walk_finds_the_api() -> None:
    """The walk is not vacuous: it sees functions, classes and methods of every kind."""
    assert len(CALLABLES) > 80
    for expected in (
        "promptmix.objective.MixtureOfPromptsLoss.forward",
        "promptmix.functional.estep.responsibilities",
        "promptmix.regularizers.ImagePrototypeLoss.forward",
        "promptmix.usage.SubpromptReviver.revive_",
        "promptmix.schedule.TemperatureSchedule",
        "promptmix.diagnostics.subprompt_usage",
        "promptmix.text_tower.ChunkCost.default",
    ):
        assert expected in IDS, expected
    assert is_data(Tensor | None) and is_data(typing.Sequence[Tensor | None])
    assert not is_data(float | Tensor) and is_scalar(typing.Literal["a"] | None)


# --------------------------------------------------------------------------- argument kinds


@pytest.mark.parametrize(("name", "obj", "skip_self"), CALLABLES, ids=IDS)
def test_data_positional_options_keyword_only(name, obj, skip_self) -> None:
    """Data arguments first and positional; every option keyword-only.

    A constructor configures: what it takes with a default (a frozen reference stored once
    included) is an option. Its required data (a model, class names) are positional.
    """
    constructor = inspect.isclass(obj)
    problems = []
    for parameter, annotation in parameters_of(obj, skip_self):
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        keyword_only = parameter.kind is parameter.KEYWORD_ONLY
        has_default = parameter.default is not parameter.empty
        data = is_data(annotation) and not (constructor and has_default)
        if data and keyword_only:
            problems.append(f"{parameter.name} is data ({annotation}) but keyword-only")
        if not keyword_only and (is_scalar(annotation) or (has_default and not data)):
            problems.append(f"{parameter.name} is an option ({annotation}) but positional")
        if annotation is inspect.Parameter.empty:
            problems.append(f"{parameter.name} has no annotation")
    assert not problems, f"{name}: " + "; ".join(problems)


# --------------------------------------------------------------------------- names


#: Other spellings of the package's concepts. A parameter may not use them.
SYNONYMS = {
    "n_subprompts": {"k", "K", "n_clusters", "num_subprompts", "n_sub_prompts", "num_clusters"},
    "num_classes": {"n_classes", "nclasses", "num_class", "classes_count"},
    "logit_scale": {
        "scale",
        "assigner_scale",
        "sim_scale",
        "similarity_scale",
        "temperature_scale",
    },
}


def all_parameters() -> Iterator[tuple[str, inspect.Parameter, object]]:
    for name, obj, skip_self in CALLABLES:
        for parameter, annotation in parameters_of(obj, skip_self):
            yield name, parameter, annotation


def test_one_name_per_concept() -> None:
    problems = []
    for name, parameter, _ in all_parameters():
        for concept, others in SYNONYMS.items():
            if parameter.name in others:
                problems.append(f"{name}({parameter.name}): call it {concept}")
        # A cosine-to-logit factor is `logit_scale`, qualified only where a function needs two.
        if parameter.name.endswith("scale") and not parameter.name.endswith("logit_scale"):
            problems.append(f"{name}({parameter.name}): a factor is *logit_scale")
    assert not problems, "\n".join(problems)


def default_key(parameter: inspect.Parameter, annotation: object) -> tuple[object, ...]:
    """Parameters of one name are one concept, unless their choices (Literals) differ."""
    literals = [m for m in members(annotation) if typing.get_origin(m) is typing.Literal]
    choices = frozenset(a for m in literals for a in typing.get_args(m))
    return (parameter.name, choices)


def test_one_default_per_concept() -> None:
    """`tau` defaults to the recommended one everywhere, `logit_scale` to CLIP's, and so on."""
    defaults: dict[tuple[object, ...], dict[object, list[str]]] = {}
    for name, parameter, annotation in all_parameters():
        if parameter.default is parameter.empty or parameter.default is None:
            continue
        key = default_key(parameter, annotation)
        defaults.setdefault(key, {}).setdefault(parameter.default, []).append(name)
    conflicts = {key: found for key, found in defaults.items() if len(found) > 1}
    assert not conflicts, conflicts
    assert defaults[("tau", frozenset())] == {PF.DEFAULT_TAU: defaults[("tau", frozenset())][0.3]}
    assert set(defaults[("logit_scale", frozenset())]) == {PF.DEFAULT_LOGIT_SCALE}


def test_one_reduction_vocabulary() -> None:
    found = 0
    for name, parameter, annotation in all_parameters():
        if parameter.name != "reduction":
            continue
        found += 1
        literals = [m for m in members(annotation) if typing.get_origin(m) is typing.Literal]
        assert literals, f"{name}: reduction is not a Literal"
        assert set(typing.get_args(literals[0])) == set(PF.REDUCTIONS), name
        assert parameter.default == "mean", name
    assert found >= 8


def test_counts_are_keyword_only_everywhere() -> None:
    for name, parameter, _ in all_parameters():
        if parameter.name in ("num_classes", "n_subprompts"):
            assert parameter.kind is parameter.KEYWORD_ONLY, name


# --------------------------------------------------------------------------- __all__


@pytest.mark.parametrize("module", all_modules(), ids=lambda m: m.__name__)
def test_every_module_has_a_sorted_all_that_holds_its_public_names(module) -> None:
    assert isinstance(getattr(module, "__all__", None), list), f"{module.__name__} has no __all__"
    names = module.__all__
    assert names == sorted(set(names), key=names.index) and len(names) == len(set(names))
    for name in names:
        assert hasattr(module, name), f"{module.__name__}.__all__ names a missing {name}"
    defined = [
        name
        for name, obj in vars(module).items()
        if not name.startswith("_")
        and (inspect.isfunction(obj) or inspect.isclass(obj))
        and getattr(obj, "__module__", None) == module.__name__
    ]
    missing = sorted(set(defined) - set(names))
    assert not missing, f"{module.__name__} defines public {missing} outside __all__"


# --------------------------------------------------------------------------- module == function


def functional_calls(function: Callable[..., object]) -> Iterator[Callable[..., object]]:
    """The `promptmix.functional` functions a method's source calls (`PF.name(...)`)."""
    source = textwrap.dedent(inspect.getsource(function))
    namespace = function.__globals__
    for node in ast.walk(ast.parse(source)):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and isinstance(node.func.value, ast.Name)
            and namespace.get(node.func.value.id) is PF
        ):
            yield getattr(PF, node.func.attr)


def module_classes() -> list[type[nn.Module]]:
    return [
        obj
        for _, obj, _ in CALLABLES
        if inspect.isclass(obj) and issubclass(obj, nn.Module) and "forward" in vars(obj)
    ]


@pytest.mark.parametrize("cls", module_classes(), ids=lambda c: c.__name__)
def test_module_and_function_take_the_same_arguments_in_the_same_order(cls) -> None:
    forward = [p.name for p in list(inspect.signature(cls.forward).parameters.values())[1:]]
    for function in functional_calls(cls.forward):
        positional = [
            p.name
            for p in inspect.signature(function).parameters.values()
            if p.kind is p.POSITIONAL_OR_KEYWORD
        ]
        if not set(positional) <= set(forward):
            continue  # a helper called on something else, not this module's twin
        order = [forward.index(name) for name in positional]
        assert order == sorted(order), (
            f"{cls.__name__}.forward{tuple(forward)} and {function.__name__}{tuple(positional)} "
            "take their data in different orders"
        )


def test_the_order_check_can_fail() -> None:
    class Swapped(nn.Module):
        def forward(self, image_features, labels, prototypes):  # type: ignore[no-untyped-def]
            return PF.image_prototype_loss(image_features, labels, prototypes)

    class Original(nn.Module):  # the order before 1.0
        def forward(self, image_features, prototypes, labels):  # type: ignore[no-untyped-def]
            return PF.image_prototype_loss(image_features, labels, prototypes)

    test_module_and_function_take_the_same_arguments_in_the_same_order(Swapped)
    with pytest.raises(AssertionError, match="different orders"):
        test_module_and_function_take_the_same_arguments_in_the_same_order(Original)


# --------------------------------------------------------------------------- parts of the loss


@pytest.mark.parametrize("cls", module_classes(), ids=lambda c: c.__name__)
def test_every_part_declares_what_its_forward_takes(cls) -> None:
    try:
        instance = cls()
    except TypeError:
        return  # needs data to be built (a learner, a loss): not a part
    inputs = getattr(instance, "inputs", None)
    if inputs is None:
        return
    parameters = inspect.signature(instance.forward).parameters
    required = {n for n, p in parameters.items() if p.default is p.empty}
    assert set(inputs) <= set(parameters), (cls.__name__, inputs)
    assert required <= set(inputs), (cls.__name__, required)
    # ... and the loss takes it the one way parts plug in.
    promptmix.MixtureOfPromptsLoss(regularizers={"part": (instance, 1.0)})


# --------------------------------------------------------------------------- shapes

C, K, D, B = 3, 2, 5, 6


def fixtures(prompts: Tensor) -> dict[str, object]:
    """Valid data for every data argument name of the API, around the given sub-prompts."""
    generator = torch.Generator().manual_seed(0)
    k = prompts.shape[1] if prompts.dim() == 3 else 1
    return {
        "image_features": torch.randn(B, D, generator=generator),
        "subprompt_features": prompts,
        "labels": torch.tensor([0, 1, 2, 0, 1, 2]),
        "anchor_features": torch.randn(C, D, generator=generator),
        "template_features": torch.randn(2, C, D, generator=generator),
        "responsibilities": torch.randn(B, k, generator=generator).softmax(-1),
        "logits": torch.randn(B, C, generator=generator),
        "zero_shot_logits": torch.randn(B, C, generator=generator),
    }


def takes_subprompts() -> list[tuple[str, Callable[..., object], bool]]:
    found = []
    for name, obj, skip_self in CALLABLES:
        names = [p.name for p, _ in parameters_of(obj, skip_self)]
        if "subprompt_features" in names and not inspect.isclass(obj):
            found.append((name, obj, skip_self))
    return found


def call(name: str, obj: Callable[..., object], skip_self: bool, prompts: Tensor) -> object:
    """`obj` on the fixtures: every required argument, and the optional data there are."""
    data = fixtures(prompts)
    arguments = {}
    for parameter, annotation in parameters_of(obj, skip_self):
        if parameter.kind is parameter.VAR_KEYWORD:
            continue
        if parameter.default is parameter.empty:
            assert parameter.name in data, f"{name}: add a fixture for {parameter.name}"
            arguments[parameter.name] = data[parameter.name]
        elif is_data(annotation) and parameter.name in data:
            arguments[parameter.name] = data[parameter.name]
    if skip_self:
        owner = getattr(promptmix, name.split(".")[-2])
        return obj(owner(), **arguments)
    return obj(**arguments)


def same(a: object, b: object) -> bool:
    if isinstance(a, Tensor):
        return isinstance(b, Tensor) and torch.allclose(a.squeeze(), b.squeeze(), equal_nan=True)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[key], b[key]) for key in a)  # type: ignore[union-attr]
    if dataclasses.is_dataclass(a):
        return dataclasses.asdict(a) == dataclasses.asdict(b)  # type: ignore[arg-type]
    return bool(a == b)


@pytest.mark.parametrize(
    ("name", "obj", "skip_self"), takes_subprompts(), ids=[n for n, _, _ in takes_subprompts()]
)
def test_one_prompt_per_class_is_k_1_everywhere(name, obj, skip_self) -> None:
    """Sub-prompt features are `(C, K, D)` everywhere, and `(C, D)` is read as `K = 1`."""
    prompts = torch.randn(C, D, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    as_k1 = call(name, obj, skip_self, prompts.unsqueeze(1))
    torch.manual_seed(0)
    as_2d = call(name, obj, skip_self, prompts)
    assert same(as_k1, as_2d), name


def test_the_shape_walk_is_not_vacuous() -> None:
    names = {name.rsplit(".", 1)[-1] for name, _, _ in takes_subprompts()}
    assert {"forward", "responsibilities", "diversity_loss", "detect_collapse"} <= names
    assert len(takes_subprompts()) >= 15


# --------------------------------------------------------------------------- device-side checks


def test_every_device_side_check_has_an_effect() -> None:
    """A check that returns a NaN-ed tensor off the CPU must have its result used."""
    returning = {"check_simplex", "check_logit_scale", "nan_where", "check_labels"}
    unused = []
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
                func = node.value.func
                called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
                if called in returning and called != "check_labels":
                    unused.append(f"{path.relative_to(SRC)}:{node.lineno} {called}")
    assert not unused, unused


# --------------------------------------------------------------------------- documented errors

TESTS = Path(__file__).parent


def documented_errors() -> list[tuple[str, str, str]]:
    """`(qualified name, short name, exception)` of every `Raises:` entry in a public docstring."""
    found = []
    for name, obj, _ in CALLABLES:
        doc = inspect.getdoc(obj) or ""
        lines = doc.splitlines()
        for index, line in enumerate(lines):
            if line.strip() != "Raises:":
                continue
            for entry in lines[index + 1 :]:
                if entry.strip() and not entry.startswith(" "):
                    break
                head = entry.strip().split(":", 1)[0]
                if (
                    entry.startswith("    ")
                    and not entry.startswith("     ")
                    and head.isidentifier()
                ):
                    found.append((name, name.rsplit(".", 1)[-1], head))
    return found


def errors_the_tests_expect() -> dict[str, set[str]]:
    """For each exception name, the names every test raising it refers to."""
    referenced: dict[str, set[str]] = {}
    for path in sorted(TESTS.glob("test_*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if not isinstance(node, ast.FunctionDef) or not node.name.startswith("test"):
                continue
            names = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
            names |= {n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute)}
            for call in ast.walk(node):
                if (
                    isinstance(call, ast.Call)
                    and isinstance(call.func, ast.Attribute)
                    and call.func.attr == "raises"
                    and call.args
                ):
                    error = call.args[0]
                    error_name = getattr(error, "id", getattr(error, "attr", None))
                    if error_name:
                        referenced.setdefault(error_name, set()).update(names)
            # Parametrized errors: the error classes named anywhere in the test's decorators.
            for decorator in node.decorator_list:
                for n in ast.walk(decorator):
                    if isinstance(n, ast.Name) and n.id.endswith("Error"):
                        referenced.setdefault(n.id, set()).update(names)
    return referenced


def test_every_documented_error_has_a_test() -> None:
    """Each `Raises:` entry has a test that calls the documented function and expects it."""
    documented = documented_errors()
    assert len(documented) >= 15
    tested = errors_the_tests_expect()
    untested = [
        f"{name} raises {error}"
        for name, short, error in documented
        if short not in tested.get(error, set())
    ]
    assert not untested, "no test expects:\n" + "\n".join(untested)
