"""What the sandbox is shown and what it may keep, checked on the bwrap command line and the settings (no I/O).

The attacks themselves run against real sandboxes in test_sandbox.py; these pin the policy they rely on: only
the system, the installation and the package are visible, never the project folder that holds the stack's
state; root's bwrap keeps nothing but the capabilities to become nobody; secrets are scrubbed from error text.
"""

from __future__ import annotations

import pytest

from tests.fixtures import REPO
from tierflow.streams.settings import Settings, SettingsError
from tierflow.tiers.sandbox import scrub
from tierflow.tiers.sandbox_bwrap import HOW_TO_GET_IT, BwrapMissing, bwrap_argv, find_bwrap, installation_paths
from tierflow.tiers.sandbox_child import under_scratch

MERGED_USR = [("/bin", "usr/bin"), ("/lib", "usr/lib"), ("/lib64", "usr/lib64")]
INSTALL = [
    "/root/.pyenv/versions/3.11.7",
    "/home/ada/project/.venv",
    "/home/ada/project/.venv/lib/python3.11/site-packages",
    "/home/ada/project/tiers",
    "/usr",
]


def values(argv: list[str], option: str) -> list[str]:
    """The argument of every `option` in a bwrap command line."""
    return [argv[i + 1] for i, arg in enumerate(argv) if arg == option]


def pairs(argv: list[str], option: str) -> list[tuple[str, str]]:
    """The (first, second) arguments of every `option` in a bwrap command line."""
    return [(argv[i + 1], argv[i + 2]) for i, arg in enumerate(argv) if arg == option]


def test_only_the_system_the_installation_and_the_package_are_shown_read_only() -> None:
    argv = bwrap_argv("bwrap", ["python", "-m", "x"], readonly=INSTALL, as_root=True, system=MERGED_USR)

    assert pairs(argv, "--ro-bind") == [
        ("/usr", "/usr"),
        ("/home/ada/project/.venv", "/home/ada/project/.venv"),
        ("/home/ada/project/tiers", "/home/ada/project/tiers"),
        ("/root/.pyenv/versions/3.11.7", "/root/.pyenv/versions/3.11.7"),
    ]
    assert pairs(argv, "--ro-bind-try") == [("/etc/ld.so.cache", "/etc/ld.so.cache")]
    assert "--bind" not in argv and "--dev-bind" not in argv
    # The project folder (where `.tierflow/` lives) is only an empty, traversable mount point.
    created = values(argv, "--dir")
    assert "/home/ada/project" in created and "/root" in created
    assert argv[-4:] == ["--", "python", "-m", "x"]


def test_an_installation_under_tmp_is_shown_through_traversable_folders_and_kept_by_the_runner() -> None:
    # A clone in /tmp (and its venv): bwrap would make the folders above it in the sandbox's /tmp 0700 root's,
    # which the sandbox's user cannot cross; and the runner's scratch, mounted over /tmp, would hide them.
    install = ["/root/.pyenv/versions/3.11.7", "/tmp/clone/.venv", "/tmp/clone/tiers", "/tmpx/other"]
    argv = bwrap_argv("bwrap", ["python"], readonly=install, as_root=True, system=MERGED_USR)

    at = argv.index("/tmp/clone")
    assert argv[at - 3:at] == ["--perms", "0755", "--dir"]
    assert argv.index("--tmpfs") < at  # made in the sandbox's /tmp, not hidden by it
    assert under_scratch(install) == ["/tmp/clone/.venv", "/tmp/clone/tiers"]


def test_root_bwrap_keeps_only_what_it_takes_to_become_nobody() -> None:
    argv = bwrap_argv("bwrap", ["python"], readonly=[], as_root=True, system=MERGED_USR)

    assert values(argv, "--cap-drop") == ["ALL"]
    assert values(argv, "--cap-add") == ["CAP_SETUID", "CAP_SETGID"]
    assert "--unshare-user" not in argv
    for option in ("--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--die-with-parent",
                   "--new-session"):
        assert option in argv


def test_an_unprivileged_bwrap_makes_a_user_namespace_and_adds_no_capability() -> None:
    argv = bwrap_argv("bwrap", ["python"], readonly=[], as_root=False, system=MERGED_USR)

    assert "--unshare-user" in argv
    assert "--cap-add" not in argv


def test_a_trainer_exchange_directory_is_the_only_writable_bind() -> None:
    argv = bwrap_argv("bwrap", ["python"], readonly=INSTALL, as_root=False, system=MERGED_USR,
                      writable=[("/var/tmp/tierflow-train-7", "/exchange")])

    assert pairs(argv, "--bind") == [("/var/tmp/tierflow-train-7", "/exchange")]


def test_the_installation_paths_never_include_the_repository_itself() -> None:
    # pytest puts the repository on sys.path; binding it would show `.tierflow/` (the token) to model code.
    paths = installation_paths()

    assert str(REPO) not in paths
    assert not any(str(REPO / ".tierflow").startswith(path.rstrip("/") + "/") for path in paths)
    assert any(path.endswith("/tiers") for path in paths)


def test_a_missing_bwrap_says_how_to_get_it() -> None:
    with pytest.raises(BwrapMissing, match="not an executable file") as caught:
        find_bwrap("/nonexistent/bwrap")

    assert HOW_TO_GET_IT in str(caught.value)


def test_known_secrets_are_scrubbed_from_error_text() -> None:
    text = "ValueError: tok-123456 and postgresql://u:pw-secret@h/db and a"

    scrubbed = scrub(text, ("tok-123456", "pw-secret", "a"))

    assert scrubbed == "ValueError: [redacted] and postgresql://u:[redacted]@h/db and a"


def test_the_sandbox_settings_know_the_stack_secrets_but_never_show_them() -> None:
    settings = Settings.from_env({"TIERFLOW_API_TOKEN": "tok-123456",
                                  "DATABASE_URL": "postgresql://tierflow:pw-secret@127.0.0.1:5/tierflow"}).sandbox

    assert set(settings.secrets) == {"tok-123456", "pw-secret", "postgresql://tierflow:pw-secret@127.0.0.1:5/tierflow"}
    assert "pw-secret" not in repr(settings) and "tok-123456" not in repr(settings)


def test_an_unknown_isolation_level_is_refused() -> None:
    with pytest.raises(SettingsError, match="TIERFLOW_SANDBOX_ISOLATION"):
        Settings.from_env({"TIERFLOW_SANDBOX_ISOLATION": "off"})
