"""`regmw demo --self-test`: the main job on embedded defaults, end to end over HTTP."""
import subprocess
import sys


def test_demo_self_test_passes_every_check(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "regmw.cli", "demo", "--self-test", "--port", "0", "--root", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "self-test: 10 of 10 checks held" in output
    assert "Traceback" not in output
    # the pushes really landed in the two layouts the classification checks
    assert (tmp_path / "old/docker/registry/v2/repositories/legacy/app/_manifests").is_dir()
    assert (tmp_path / "new/docker/registry/v2/repositories/fresh/app/_manifests").is_dir()
    assert not (tmp_path / "new/docker/registry/v2/repositories/forged").exists()


def test_plugins_command_lists_the_builtins(tmp_path):
    config = tmp_path / "all.toml"
    config.write_text('[regmw]\nplugins = ["migration", "gcs", "redis", "dbroute"]\n'
                      '[migration]\nnew_root = "gitlab/v2"\n[gcs]\nbucket = "b"\nanonymous = true\nendpoint = "http://127.0.0.1:1"\n'
                      '[database]\nprimary = "postgresql://postgres@127.0.0.1:1/none"\n')
    result = subprocess.run([sys.executable, "-m", "regmw.cli", "--config", str(config), "plugins"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    for name in ("regmw_migration  (built-in)", "regmw_gcs  (built-in)", "regmw_redis  (built-in)",
                 "regmw_dbroute  (built-in)", "regmw.defaults.memory_cache  (embedded default)"):
        assert name in result.stdout
