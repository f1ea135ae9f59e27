"""The XID catalog (NVIDIA's r5xx Xid Catalog) and the default health policy drawn from it."""

import pytest

from portal.health.catalog import CATALOG, Action, XidEntry

REQUIRED = [8, 13, 31, 32, 38, 43, 45, 48, 56, 57, 61, 62, 63, 64, 68, 69, 74, 79, 92, 94, 95]
REQUIRED += [109, 110, 119, 120, 121, 136, 140, 143, *range(144, 151)]


def test_it_covers_the_codes_operators_meet():
    assert [c for c in REQUIRED if c not in CATALOG] == []


@pytest.mark.parametrize(
    ("code", "action"),
    [
        (13, Action.NOTIFY_TENANT),
        (31, Action.NOTIFY_TENANT),
        (43, Action.NOTIFY_TENANT),
        (45, Action.RECORD),
        (48, Action.CORDON_GPU),
        (63, Action.CORDON_GPU),
        (64, Action.CORDON_GPU),
        (74, Action.CORDON_GPU),
        (92, Action.CORDON_GPU),
        (94, Action.CORDON_GPU),
        (95, Action.CORDON_GPU),
        (79, Action.CORDON_NODE),
        (121, Action.RECORD),
    ],
)
def test_it_defaults_to_the_product_policy(code, action):
    assert CATALOG[code].action == action


@pytest.mark.parametrize(
    ("code", "title", "nvidia_action"),
    [
        (13, "Graphics Engine Exception", "RESTART_APP"),
        (48, "Double Bit ECC Error", "WORKFLOW_XID_48"),
        (74, "NVLINK Error", "WORKFLOW_NVLINK_ERR"),
        (79, "GPU has fallen off the bus", "RESTART_BM"),
        (95, "Uncontained memory error", "RESET_GPU"),
        (119, "GSP RPC Timeout", "RESET_GPU"),
        (150, "NVLINK: MSE Error", "WORKFLOW_NVLINK5_ERR"),
    ],
)
def test_it_words_titles_and_actions_as_nvidia_does(code, title, nvidia_action):
    assert (CATALOG[code].title, CATALOG[code].nvidia_action) == (title, nvidia_action)


@pytest.mark.parametrize("entry", list(CATALOG.values()), ids=lambda e: f"xid{e.code}")
def test_it_gives_every_entry_a_valid_action_title_and_note(entry: XidEntry):
    assert entry.action in Action.values
    assert entry.title.strip() and len(entry.title) <= 200  # HealthRule.title
    assert entry.nvidia_action.strip()
    assert entry.note.strip() and len(entry.note) <= 300  # HealthRule.note
    assert entry.note.endswith(".")
    assert CATALOG[entry.code] is entry


def test_it_cordons_for_every_gpu_reset_nvidia_asks_for():
    resets = {c: e.action for c, e in CATALOG.items() if e.nvidia_action == "RESET_GPU"}
    assert set(resets.values()) <= {Action.CORDON_GPU, Action.CORDON_NODE}


def test_it_cordons_the_node_when_nvidia_asks_for_a_node_restart():
    assert [c for c, e in CATALOG.items() if e.nvidia_action == "RESTART_BM"] == [79]
    assert CATALOG[79].action == Action.CORDON_NODE
