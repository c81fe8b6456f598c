"""The schema is the single source of truth: committed JSON Schema, docs and reload scopes come from it."""

from __future__ import annotations

import json

from harness.daemons import REPO, run_daemon

from daemon.config.rules import LIFTED, RULES, RULES_BY_ID
from daemon.config.schema import SECTIONS, SETTINGS, Reload, json_schema

COMMITTED = REPO / "schemas" / "server.schema.json"


def _property_schema(schema: dict, key: str) -> dict:
    """The JSON Schema of a dotted key, following $refs through the sections."""
    node = schema
    for part in key.split("."):
        node = node["properties"][part]
        if "$ref" in node:
            node = {**schema["$defs"][node["$ref"].rsplit("/", 1)[1]], **{k: v for k, v in node.items() if k != "$ref"}}
    return node


def test_committed_schema_matches_daemon_schema():
    printed = run_daemon("schema")
    assert printed.returncode == 0, printed.stderr
    assert json.loads(printed.stdout) == json.loads(COMMITTED.read_text()), (
        "schemas/server.schema.json is stale: run `daemon schema > schemas/server.schema.json`"
    )


def test_every_setting_has_description_and_reload_scope_in_the_json_schema():
    schema = json_schema()
    scopes = {scope.value for scope in Reload}
    for key in SETTINGS:
        prop = _property_schema(schema, key)
        assert prop.get("description", "").strip(), f"{key} has no description"
        assert prop.get("x-reload") in scopes, f"{key} has no valid x-reload"
    for key in SECTIONS:
        assert _property_schema(schema, key).get("description"), f"table [{key}] has no description"


def test_reload_scopes_are_decided_field_by_field():
    # A few decisions the reload issue relies on; changing one is a design change.
    expected = {
        "server.api_key": Reload.LIVE,
        "server.port": Reload.FRONTEND,
        "server.tls.refresh": Reload.LIVE,
        "tokenizer.workers": Reload.TOKENIZER,
        "scheduler.max_running_requests": Reload.LIVE,
        "scheduler.max_total_tokens": Reload.WORKER,
        "scheduler.enable_prefix_caching": Reload.LIVE,  # the scheduler owns the cache map: it drops it in place
        "model.path": Reload.WORKER,
        "model.served_model_name": Reload.LIVE,
        "logging.level": Reload.LIVE,
        "runtime.dir": Reload.SUPERVISOR,
        "distributed.nnodes": Reload.SUPERVISOR,
    }
    assert {key: SETTINGS[key].reload for key in expected} == expected


def test_secrets_are_write_only_in_the_schema():
    schema = json_schema()
    secrets = [key for key, info in SETTINGS.items() if info.is_secret]
    assert secrets == ["server.api_key", "server.tls.keyfile_password"]
    for key in secrets:
        assert _property_schema(schema, key).get("writeOnly") is True


def test_toml_schema_has_no_nulls():
    # TOML cannot write null: an unset optional key is simply absent.
    assert '"null"' not in json.dumps(json_schema())


def test_catalogue_has_at_least_25_rules_with_stable_unique_ids():
    ids = [rule.id for rule in RULES]
    assert len(ids) == len(set(ids)) == len(RULES_BY_ID)
    assert len([r for r in RULES if r.check is not None]) >= 25
    for rule in RULES:
        assert rule.id.count(".") >= 1 and rule.id == rule.id.lower(), rule.id
        assert rule.summary and rule.fix, rule.id
        assert rule.severity.value in ("error", "warning")


def test_rules_read_only_real_keys():
    for rule in [*RULES, *LIFTED]:
        for key in rule.keys:
            assert key in SETTINGS, f"{rule.id} reads unknown key {key}"


def test_schema_enforced_rules_have_their_bounds_in_the_schema():
    schema = json_schema()
    for rule in (r for r in RULES if r.check is None):
        for key in rule.keys:
            prop = _property_schema(schema, key)
            assert {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "enum"} & set(prop), (
                f"{rule.id} says the schema bounds {key}, but its schema has no bound"
            )


def test_the_required_sglang_rules_are_in_the_catalogue():
    required = [
        "tls.key-without-cert",
        "tls.cert-without-key",
        "tls.file-missing",
        "tls.ca-without-cert",
        "tls.password-without-key",
        "tls.refresh-without-cert",
        "server.http2-streams-range",
        "workers.min",
        "server.port-range",
        "ports.conflict",
        "model.tp-size-min",
        "model.tp-divides-heads",
        "model.tp-exceeds-gpus",
        "model.cuda-unavailable",
        "model.context-exceeds-model",
        "scheduler.total-tokens-below-context",
        "scheduler.chunked-prefill-size",
        "scheduler.policy-choice",
        "model.served-name-colon",
        "model.path-missing",
        "tokenizer.path-missing",
        "distributed.node-rank-range",
        "distributed.init-addr-required",
        "distributed.tp-divisible-by-nnodes",
        "server.public-without-api-key",
    ]
    assert [rule_id for rule_id in required if rule_id not in RULES_BY_ID] == []
    assert RULES_BY_ID["server.public-without-api-key"].severity.value == "warning"
    assert {lifted.id for lifted in LIFTED} == {"lifted.http2-with-tls-refresh", "lifted.http2-with-tokenizer-workers"}
