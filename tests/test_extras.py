"""``import_extra`` (tests/conftest.py): an optional backend that is installed but broken fails the
test file instead of skipping it; one that is not installed skips it, unless the install is meant
to have every extra."""

from __future__ import annotations

import pytest

from tests.conftest import REQUIRE_EXTRAS, import_extra


def test_an_installed_but_unimportable_extra_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(REQUIRE_EXTRAS, raising=False)
    # pytest's distribution is installed; its "module" here is not: what a broken install looks like
    with pytest.raises(pytest.fail.Exception, match=r"^pytest \S+ is installed but `import splitllama_no_such_module` fails"):
        import_extra("splitllama_no_such_module", "pytest", "dev")


def test_a_missing_extra_skips_unless_required(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(REQUIRE_EXTRAS, raising=False)
    with pytest.raises(pytest.skip.Exception, match=r"splitllama-no-such-dist is not installed \(pip install -e '.\[megatron\]'\)"):
        import_extra("splitllama_no_such_module", "splitllama-no-such-dist", "megatron")
    monkeypatch.setenv(REQUIRE_EXTRAS, "1")
    with pytest.raises(pytest.fail.Exception, match=f"splitllama-no-such-dist is not installed but {REQUIRE_EXTRAS} is set"):
        import_extra("splitllama_no_such_module", "splitllama-no-such-dist", "megatron")


def test_an_importable_extra_is_returned() -> None:
    assert import_extra("json", "pytest", "dev").__name__ == "json"
