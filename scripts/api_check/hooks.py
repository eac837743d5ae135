"""Checks of mailbridge's own error contract, on top of schemathesis' built-in ones.

Loaded through SCHEMATHESIS_HOOKS by scripts/api-check.sh.
"""

import re

import schemathesis


def _names_in(value, names):
    """Every key of a JSON value, at any depth."""
    if isinstance(value, dict):
        for key, inner in value.items():
            names.add(str(key))
            _names_in(inner, names)
    elif isinstance(value, list):
        for inner in value:
            _names_in(inner, names)


def _properties_of(schema, raw, names, seen):
    """The property names a request body schema has, through its $refs."""
    if not isinstance(schema, dict):
        return
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/") and ref not in seen:
        seen.add(ref)
        target = raw
        for part in ref[2:].split("/"):
            target = target.get(part, {}) if isinstance(target, dict) else {}
        _properties_of(target, raw, names, seen)
    for name, inner in (schema.get("properties") or {}).items():
        names.add(name)
        _properties_of(inner, raw, names, seen)
    _properties_of(schema.get("items"), raw, names, seen)
    for key in ("oneOf", "anyOf", "allOf"):
        for inner in schema.get(key) or []:
            _properties_of(inner, raw, names, seen)


@schemathesis.check
def errors_have_the_shape_and_name_the_field(ctx, response, case):
    """Every 4xx is {"error": {"code", "message"}} with a non-empty message;
    a refused request's message names what was wrong with it: a field of the
    body, a parameter of the path or query, or the body as a whole."""
    status = response.status_code
    if status < 400 or status >= 500:
        return None
    if not response.headers.get("content-type", [""])[0].startswith("application/json"):
        # The OAuth callback answers the person's browser with a page.
        if case.path.endswith("/callback"):
            return None
        raise AssertionError(f"{status} without a JSON error body")
    body = response.json()
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict) or not error.get("code") or not error.get("message"):
        raise AssertionError(f"{status} does not have the error shape: {body!r}")
    if status not in (400, 422):
        return None
    names = set()
    for part in (case.path_parameters, case.query, case.body):
        _names_in(part, names)
    names |= set((case.path_parameters or {}).keys())
    names.update(p.name for p in case.operation.iter_parameters())
    raw = case.operation.schema.raw_schema
    operation = raw.get("paths", {}).get(case.operation.path, {}).get(case.method.lower(), {})
    for content in operation.get("requestBody", {}).get("content", {}).values():
        _properties_of(content.get("schema", {}), raw, names, set())
    message = error["message"]
    # Whole words only ("id" is not named by "invalid"); a name that is also
    # an everyday word counts only as a field is written: `to[0]`, `to:`,
    # "after must …".
    tokens = re.findall(r"[A-Za-z_][A-Za-z0-9_-]*", message)
    everyday = {"to", "from", "name", "type", "date", "text", "before", "after"}
    named = {
        token for token in tokens
        if token in names and (token not in everyday
                               or re.search(re.escape(token) + r"(\[|:|`| must)", message))
    }
    # The body as a whole (not JSON, not a message), or the query string.
    whole = {"body", "query", "JSON", "Content-Type"} & set(tokens)
    if not named and not whole:
        raise AssertionError(
            f"{status} {error['code']}: the message names no field: {message!r}"
        )
    return None


# `POST /v1/inspect` takes a message's source as it is.
schemathesis.serializer.alias("message/rfc822", "application/octet-stream")
