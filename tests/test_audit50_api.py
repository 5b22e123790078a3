"""Stop 50's audit of the API's input edges (each test failed on the code before it).

- A workspace root too long for the file system (a component over 255 bytes, a path
  over PATH_MAX) raised a bare ``OSError`` (ENAMETOOLONG) out of ``store.workspace``
  and ``tx.files(root)``: CONTRACT section 2 lets no OSError escape the API.  Now a
  ValueError naming the root, as a root that does not exist.
- A 100 KB restore point name or action id asked for was echoed whole into the
  UnknownPoint / UnknownAction message: now cut, with its length said.
"""
from __future__ import annotations

import pytest
from click.testing import CliRunner

import walstore
from walstore.cli import main as cli


@pytest.fixture
def store(tmp_path):
    s = walstore.open(str(tmp_path / "s"), durability="none")
    yield s
    s.close()


@pytest.mark.parametrize("root", ["/" + "y" * 300, "/" + "y/" * 3000],
                         ids=["long-component", "past-PATH_MAX"])
def test_a_root_too_long_for_the_file_system_is_a_value_error(store, root):
    with pytest.raises(ValueError, match="too long for the file system") as e:
        store.workspace(root)
    assert not isinstance(e.value, OSError) and len(str(e.value)) < 300
    tx = store.transaction()
    with pytest.raises(ValueError, match="too long"):
        tx.files(root)
    tx.rollback()
    assert store.workspaces() == []


def test_the_cli_says_it_in_one_line(tmp_path):
    walstore.open(str(tmp_path / "s")).close()
    r = CliRunner().invoke(cli, ["files", str(tmp_path / "s"), "--workspace",
                                 "/" + "y" * 300])
    assert r.exit_code in (1, 2) and "Traceback" not in r.output, r.output
    assert len((r.stderr or r.output).strip().splitlines()) == 1, r.output


@pytest.mark.parametrize("ask", [
    lambda s, big: s.rewind(big),
    lambda s, big: s.at(big),
    lambda s, big: s.log(since=big),
    lambda s, big: s.drop_restore_point(big),
    lambda s, big: s.get_action(big),
    lambda s, big: s.resolve(big),
], ids=["rewind", "at", "log-since", "drop_restore_point", "get_action", "resolve"])
def test_a_huge_name_asked_for_is_not_echoed_whole(store, ask):
    big = "n" * 100_000
    with pytest.raises(KeyError) as e:
        ask(store, big)
    text = str(e.value)
    assert len(text) < 300 and "100,002 characters" in text, text[:300]
    assert isinstance(e.value, walstore.WalstoreError)


def test_resolve_without_a_note_keeps_the_last_error(tmp_path):
    """``resolve(id)`` with no note replaced the action's error (why its compensation
    failed) by None: the record of the failure lost.  A note still replaces it."""
    def refund(action):
        raise RuntimeError("payments API down (503)")
    with walstore.open(str(tmp_path / "s"), durability="none",
                       compensators={"refund": refund}) as store:
        ids = []
        for _ in range(2):
            tx = store.transaction()
            with tx.action("charge", compensate="refund") as act:
                act.result = {"id": 1}
            ids.append(act.id)
            with pytest.raises(walstore.CompensationFailed):
                tx.rollback()
        assert "payments API down" in store.get_action(ids[0]).error
        assert "payments API down" in store.resolve(ids[0]).error
        assert "payments API down" in store.get_action(ids[0]).error
        assert store.get_action(ids[0]).state == "resolved"
        assert store.resolve(ids[1], note="refunded by phone").error == "refunded by phone"
