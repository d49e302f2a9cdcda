"""The method registry: resolution, composition rules, suggestions, derived docs and the loss adapter."""

import dataclasses
import inspect
import itertools
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import preftune.losses as L
from preftune.config import TrainConfig, config_value, load_config
from preftune.losses import registry
from preftune.losses.components import SLOTS, Component, register
from preftune.method_adapter import LossAdapter, SideScores

ROOT = Path(__file__).parents[1]
METHODS_DOC = ROOT / "docs" / "methods.md"
BY_SLOT = {s: [n for n, c in L.COMPONENTS.items() if c.slot == s] for s in SLOTS}
#: The components that existed before the DPO family joined: the adapter must match the old code on them.
CLASSIC = {"dpo", "ipo", "hinge", "mallows_phi", "mrpo", "mdpo", "mallows_theta", "rpo", "rpo_uniform"}
CLASSIC |= {"rpo_diagonal", "rpo_unpaired"}


def test_every_component_resolves_alone_into_its_slot():
    assert set(L.COMPONENTS) >= {"dpo", "mrpo", "mdpo", "mallows_theta", "mallows_phi", "rpo", "rpo_unpaired"}
    for name, component in L.COMPONENTS.items():
        spec = L.resolve_method(name)
        assert spec.method == name and spec.components == (name,)
        assert getattr(spec, component.slot) is component
        assert spec.needs == component.needs
        assert spec.unpaired == component.unpaired


def test_defaults_fill_the_empty_slots():
    spec = L.resolve_method("mallows_theta")
    assert (spec.reference.value, spec.pairing.value, spec.link.value) == ("single", "diagonal", "sigmoid")
    assert L.resolve_method("rpo").scale is None


def _combinations(only=None):
    """Every choice of at most one component per slot (the empty choice excluded)."""
    choices = [[None, *(n for n in BY_SLOT[s] if only is None or n in only)] for s in SLOTS]
    for combo in itertools.product(*choices):
        names = [n for n in combo if n is not None]
        if names:
            yield names


def test_every_composition_resolves_or_is_refused_by_the_unpaired_rule():
    resolved = refused = 0
    for names in _combinations(CLASSIC):
        parts = [L.COMPONENTS[n] for n in names]
        unpaired = any(c.unpaired for c in parts)
        pairs_only = [c.name for c in parts if not c.unpaired and not c.supports_unpaired]
        if unpaired and pairs_only:
            with pytest.raises(L.MethodError) as err:
                L.resolve_method("+".join(names))
            assert all(repr(n) in str(err.value) for n in pairs_only) and "\n" not in str(err.value)
            refused += 1
            continue
        spec = L.resolve_method("+".join(names))
        backwards = L.resolve_method("+".join(reversed(names)))
        assert spec.parts == backwards.parts  # order does not matter
        for c in parts:
            assert getattr(spec, c.slot) is c
        assert spec.needs == frozenset().union(*(c.needs for c in parts))
        resolved += 1
    assert resolved > 50 and refused > 0


@pytest.mark.parametrize("slot", [s for s in SLOTS if len(BY_SLOT[s]) > 1 and s != "link"])
def test_two_components_for_one_slot_are_refused_naming_both(slot):
    for a, b in itertools.combinations(BY_SLOT[slot], 2):
        with pytest.raises(L.MethodError) as err:
            L.resolve_method(f"{a}+{b}")
        message = str(err.value)
        assert repr(a) in message and repr(b) in message and slot in message and "\n" not in message


@pytest.mark.parametrize(
    "method, canonical",
    [
        ("MRPO", "mrpo"),
        ("mallows-theta", "mallows_theta"),
        ("Mallows-Theta + RPO", "mallows_theta+rpo"),
        ("rpo-unpaired+HINGE", "rpo_unpaired+hinge"),
    ],
)
def test_case_and_dashes_are_forgiven_only_when_lenient(method, canonical):
    assert L.resolve_method(method, lenient=True).method == canonical
    with pytest.raises(L.MethodError, match="did you mean"):
        L.resolve_method(method)


@pytest.mark.parametrize(
    "method, suggestion",
    [
        ("mrp", "mrpo"),
        ("mallow_phi", "mallows_phi"),
        ("dpo+rpo_unpared", "rpo_unpaired"),
        ("ipo+mdop", "mdpo"),
    ],
)
def test_misspellings_suggest_the_closest_name(method, suggestion):
    with pytest.raises(L.MethodError) as err:
        L.resolve_method(method, lenient=True)
    message = str(err.value)
    assert f"did you mean {suggestion!r}?" in message and "\n" not in message
    assert all(n in message for n in L.COMPONENTS)  # and lists every valid name


def test_no_suggestion_for_a_name_far_from_all():
    with pytest.raises(L.MethodError) as err:
        L.resolve_method("xyzzy", lenient=True)
    assert "did you mean" not in str(err.value) and "rpo_unpaired" in str(err.value)


def test_lenient_matching_refuses_an_ambiguous_spelling(monkeypatch):
    a = dataclasses.replace(L.COMPONENTS["dpo"], name="new_link")
    b = dataclasses.replace(L.COMPONENTS["dpo"], name="new-link")
    monkeypatch.setattr(registry, "COMPONENTS", {"new_link": a, "new-link": b})
    with pytest.raises(L.MethodError):
        registry.resolve_method("NEW_LINK", lenient=True)
    assert registry.resolve_method("new-link", lenient=True).link is b


def test_method_spec_is_frozen_and_registration_is_unique():
    spec = L.resolve_method("mrpo")
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.method = "dpo"  # type: ignore[misc]
    with pytest.raises(ValueError, match="registered twice"):
        register(L.COMPONENTS["dpo"])
    with pytest.raises(ValueError, match="slot"):
        Component("x", "lnk", "x", print, summary="")  # type: ignore[arg-type]


def test_options_name_real_config_keys_and_real_loss_keywords():
    cfg = TrainConfig()
    paired = set(inspect.signature(L.preference_loss).parameters)
    unpaired = set(inspect.signature(L.unpaired_preference_loss).parameters)
    for c in L.COMPONENTS.values():
        for option in c.options:
            config_value(cfg, option.key)  # AttributeError if the key does not exist
            if option.kwarg is not None and option.link:  # a keyword of the link's own implementation
                assert option.kwarg in inspect.signature(c.impl).parameters, (c.name, option)
            elif option.kwarg is not None:
                assert option.kwarg in (unpaired if c.unpaired else paired), (c.name, option)


def test_named_loss_functions_are_component_names_and_exported():
    from preftune.losses import functional

    assert set(functional.__all__) <= set(L.COMPONENTS)
    for name in functional.__all__:
        assert name in L.__all__ and callable(getattr(L, name))
    for name in L.COMPONENTS:  # and every component is a loss function of the same name
        assert name in L.__all__ and callable(getattr(L, name)), name


def test_methods_table_in_the_docs_is_current():
    doc = METHODS_DOC.read_text()
    assert registry.methods_table() in doc, (
        "docs/methods.md is stale: paste preftune.losses.registry.methods_table() between the "
        "methods-table markers"
    )


def _anchors(text: str) -> set[str]:
    ids = set(re.findall(r'<a id="([^"]+)"></a>', text))
    for heading in re.findall(r"^#+ (.+)$", text, flags=re.M):
        ids.add(re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-"))
    return ids


def test_every_component_and_every_link_to_the_docs_has_an_anchor():
    anchors = _anchors(METHODS_DOC.read_text())
    assert set(L.COMPONENTS) <= anchors
    links = set()
    for path in [*(ROOT / "src" / "preftune").rglob("*.py"), *(ROOT / "tests").rglob("*.py")]:
        links |= set(re.findall(r"docs/methods\.md#([\w\-]+)", path.read_text()))
    assert links and links <= anchors, links - anchors


def test_config_help_lists_every_component():
    help_text = dataclasses.fields(TrainConfig)[1].metadata["help"]
    assert all(name in help_text for name in L.COMPONENTS)


def test_importing_the_losses_stays_light():
    code = (
        "import sys, preftune.losses; "
        "print([m for m in ('matplotlib', 'tensorboard', 'sentence_transformers', 'datasets', "
        "'transformers') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


# -- the trainer's adapter -------------------------------------------------------------------------


def _old_loss_computer(cfg, spec, policy, lengths, refs, c, emb):
    """The trainer's per-method if-chain as it was before the registry, for comparison."""
    kw = dict(
        beta=cfg.beta,
        label_smoothing=cfg.label_smoothing,
        reference_free=cfg.reference_free,
        gamma=cfg.gamma,
        sft_weight=cfg.sft_weight,
    )
    extra = {}
    if spec["scale"] == "mallows_theta":
        extra["scale"] = c
    if spec["link"] == "mallows_phi":
        extra["dispersion"] = torch.exp(-c)
    if spec["pairing"] == "rpo":
        extra["prompt_embeddings"] = emb
    return L.preference_loss(
        policy["chosen"],
        policy["rejected"],
        refs["chosen"],
        refs["rejected"],
        reference=spec["reference"],
        pairing=spec["pairing"],
        link=spec["link"],
        tau=cfg.rpo.tau,
        diagonal_weight=cfg.rpo.diagonal_weight,
        weights=cfg.mrpo.weights,
        clip_eps=cfg.mrpo.clip_eps,
        clip=cfg.mrpo.clip,
        chosen_lengths=lengths["chosen"],
        **extra,
        **kw,
    )


@pytest.mark.parametrize(
    "names", [n for n in _combinations(CLASSIC) if "rpo_unpaired" not in n], ids="+".join
)
def test_adapter_matches_the_old_per_method_code(names):
    method = "+".join(names)
    spec = L.resolve_method(method)
    refs_k = 2 if spec.multi_reference else 1
    cfg = load_config(
        {
            "method": method,
            "references": ["policy", "other"][:refs_k],
            "beta": 0.3,
            "label_smoothing": 0.1 if spec.link.label_smoothing else 0.0,
            "sft_weight": 0.2,
            "rpo": {"tau": 0.3, "diagonal_weight": 0.6},
            "mrpo": {"clip_eps": 0.2, "weights": "adaptive"},
        }
    )
    g = torch.Generator().manual_seed(len(method))
    b = 5
    policy = {s: -torch.rand(b, generator=g, dtype=torch.float64) * 20 for s in ("chosen", "rejected")}
    refs = {s: -torch.rand(refs_k, b, generator=g, dtype=torch.float64) * 20 for s in ("chosen", "rejected")}
    lengths = {s: torch.randint(1, 9, (b,), generator=g) for s in ("chosen", "rejected")}
    c = torch.rand(b, generator=g, dtype=torch.float64) + 0.5
    emb = torch.randn(b, 6, generator=g)
    adapter = LossAdapter.from_config(cfg)
    got = adapter(SideScores(policy, lengths), SideScores(refs), dispersion=c, embeddings=emb)
    ln = adapter.length_normalize
    assert ln == (spec.link.name == "ipo")

    def norm(x, side):
        return x / lengths[side].clamp(min=1).to(x.dtype) if ln else x

    want = _old_loss_computer(
        cfg,
        spec.as_dict(),
        {s: norm(v, s) for s, v in policy.items()},
        lengths,
        {s: norm(v, s) for s, v in refs.items()},
        c,
        emb,
    )
    torch.testing.assert_close(got.losses, want.losses, rtol=0, atol=0)
    assert got.metrics.keys() == want.metrics.keys()
