"""Configuration: validation errors name the key, env and Flask overrides work."""
import pytest
from regmw import ConfigError, build
from regmw.cli import main


def write(tmp_path, text):
    path = tmp_path / "regmw.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "text, message",
    [
        ("[cache]\nmax_entrys = 5\n", "unknown key cache.max_entrys"),
        ("[rdis]\nurl = 'redis://x'\n", "unknown section [rdis]"),
        ("[cache]\nmax_entries = 'many'\n", "cache.max_entries"),
        ("[cache]\nmax_entries = 0\n", "cache.max_entries: must be at least 1"),
        ("[ratelimit]\nfail_open = 'maybe'\n", "ratelimit.fail_open: must be true or false"),
        ("[ratelimit]\nstrategy = 'leaky'\n", "ratelimit.strategy: must be one of"),
        ("[[ratelimit.rules]]\nby = 'client'\nlimit = 'lots'\n", "ratelimit.rules: rules[0].limit 'lots' is not a limit"),
        ("[[ratelimit.rules]]\nby = 'planet'\nlimit = '1/second'\n", "rules[0].by must be one of"),
        # the name and the limits name a rule's counters in Redis: repeated, Redis would count what memory does not
        ("[[ratelimit.rules]]\nname = 'r'\nby = 'repository'\nmethods = 'read'\nlimit = '9/minute'\n"
         "[[ratelimit.rules]]\nname = 'r'\nby = 'repository'\nmethods = 'write'\nlimit = '9/minute'\n",
         "rules[1].name 'r' is already the name of another rule"),
        ("[[ratelimit.rules]]\nlimit = '9/minute;9 per 1 minute'\n", "rules[0].limit '9/minute;9 per 1 minute' repeats a limit"),
        # "LIMITER/<name>/<identity>/...": rule 'r' counting group/app and rule 'r/group' counting app would share a key
        ("[[ratelimit.rules]]\nname = 'r/group'\nby = 'repository'\nlimit = '9/minute'\n",
         "rules[0].name 'r/group' contains '/'"),
        ("[[ratelimit.rules]]\nname = '{r}'\nlimit = '9/minute'\n", "rules[0].name '{r}' contains '/'"),
        # a limit written where the rules go: json's "Extra data: line 1 column 3" alone said nothing
        ("[ratelimit]\nrules = '100/minute'\n", "ratelimit.rules: must be a list of tables (as JSON when given as a string"),
        ("[regmw]\ntrusted_proxies = ['not-a-network']\n", "regmw.trusted_proxies"),
        ("[regmw]\nplugins = ['nosuch']\n", "unknown plugin 'nosuch'"),
        ("not toml [", "not valid TOML"),
        # sent back on every API answer: gunicorn refuses such a name, and every answer was its HTML 500
        ("[serve]\nrequest_id_header = 'X Request Id'\n", "serve.request_id_header: must be an HTTP header name"),
        ("[serve]\nrequest_id_header = ''\n", "serve.request_id_header: must be an HTTP header name"),
        ("[serve]\nrequest_id_header = 'X_Request_Id'\n", "serve.request_id_header: must be an HTTP header name"),
    ],
)
def test_bad_config_is_one_line_naming_the_key(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as error:
        build(path, environ={})
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_check_config_cli_prints_one_line_and_exits_2(tmp_path, capsys):
    path = write(tmp_path, "[cache]\nmax_entrys = 5\n")
    assert main(["check-config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cache.max_entrys" in err and "Traceback" not in err


def test_check_config_ok(tmp_path, capsys):
    path = write(tmp_path, "[cache]\nmax_entries = 5\n")
    assert main(["check-config", str(path)]) == 0
    assert "ok" in capsys.readouterr().out


def test_bad_url_is_refused_at_start(tmp_path):
    from regmw.config import Option, Section, validate

    sections = {"x": Section("x", "test", {"url": Option("url", None, "", schemes=("redis", "rediss"))})}
    with pytest.raises(ConfigError, match="x.url: not a URL"):
        validate({"x": {"url": "http://nope"}}, sections)
    with pytest.raises(ConfigError, match="missing required option x.url"):
        validate({}, {"x": Section("x", "t", {"url": Option("url", required=True)})})


def test_environment_overrides_file(tmp_path):
    path = write(tmp_path, "[cache]\nmax_entries = 5\n[regmw]\nipv6_prefix = 48\n")
    runtime = build(path, environ={"REGMW_CACHE_MAX_ENTRIES": "7", "REGMW_IPV6_PREFIX": "56"})
    assert runtime.config["cache"]["max_entries"] == 7
    assert runtime.services.cache.max_entries == 7
    assert runtime.config["regmw"]["ipv6_prefix"] == 56


def test_environment_override_is_validated():
    with pytest.raises(ConfigError, match="cache.max_entries"):
        build({}, environ={"REGMW_CACHE_MAX_ENTRIES": "-3"})


def test_generated_configuration_reference_is_current():
    assert main(["config-docs", "--check", "docs/configuration.md"]) == 0


def test_an_options_check_may_normalise_to_a_falsy_value():
    """docs/hooks.md: `check` "returns it (possibly normalised)": an empty string, 0 or [] included
    (a check returning None keeps the value)."""
    from regmw.config import Option, Section, validate

    section = Section("norm", "x", {
        "name": Option("str", "x", "stripped", check=str.strip),
        "count": Option("int", 1, "clamped to 0..9", check=lambda value: max(0, min(value, 9))),
        "kept": Option("str", "x", "validated only", check=lambda value: None),
    })
    values = validate({"norm": {"name": "   ", "count": -5, "kept": "as is"}}, {"norm": section})["norm"]
    assert values == {"name": "", "count": 0, "kept": "as is"}


@pytest.mark.parametrize("value, line", [
    ('"many"', "cache.max_entries: must be a whole number (got 'many')"),
    ("[1, 2]", "cache.max_entries: must be a whole number (got [1, 2])"),
    ('"2.5"', "cache.max_entries: must be a whole number (got '2.5')"),
], ids=["word", "list", "decimal-string"])
def test_a_number_that_is_not_one_is_named_in_plain_words(tmp_path, capsys, value, line):
    """Not Python's "invalid literal for int() with base 10": the one line says what the key must be."""
    config = tmp_path / "c.toml"
    config.write_text(f"[cache]\nmax_entries = {value}\ndefault_ttl = 1\n")
    assert main(["check-config", str(config)]) == 2
    assert capsys.readouterr().err == f"regmw: configuration error: {config}: {line}\n"
    if value != '"2.5"':  # a number for a float option
        config.write_text(f"[cache]\ndefault_ttl = {value}\n")
        assert main(["check-config", str(config)]) == 2
        assert f"cache.default_ttl: must be a number (got {value.replace(chr(34), chr(39))})" in capsys.readouterr().err


def test_a_bad_value_from_the_environment_names_the_variable(tmp_path, capsys, monkeypatch):
    """The file named in the line does not hold the value: the line says which variable does."""
    config = tmp_path / "c.toml"
    config.write_text("[cache]\nmax_entries = 10\n")
    monkeypatch.setenv("REGMW_CACHE_MAX_ENTRIES", "many")
    assert main(["check-config", str(config)]) == 2
    assert capsys.readouterr().err == (f"regmw: configuration error: {config}: cache.max_entries "
                                       "(from REGMW_CACHE_MAX_ENTRIES): must be a whole number (got 'many')\n")
    monkeypatch.setenv("REGMW_CACHE_MAX_ENTRIES", "20")
    assert build(str(config)).config["cache"]["max_entries"] == 20
    monkeypatch.setenv("REGMW_SERVE_REQUEST_ID_HEADER", "X-Trace")
    assert type(build(str(config)).config["serve"]["request_id_header"]) is str  # a plain str, as from the file
