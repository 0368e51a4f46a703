"""Checks structured-output responses: every line of the JSONL file is {"schema", "text"}; each
text must parse as JSON and validate against its schema (the jsonschema package).
Usage: validate_json.py FILE"""
import json
import sys

import jsonschema

bad = []
n = 0
with open(sys.argv[1]) as f:
    for line in f:
        n += 1
        case = json.loads(line)
        try:
            jsonschema.validate(json.loads(case["text"]), case["schema"])
        except (ValueError, jsonschema.ValidationError) as e:
            bad.append((case["text"], str(e)[:200]))
if bad:
    for text, err in bad[:5]:
        print(f"invalid: {text!r}: {err}")
    sys.exit(f"{len(bad)} of {n} responses are invalid")
print(f"ok {n}")
