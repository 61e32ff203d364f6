"""Validate deploy/rayjob.yaml against KubeRay's RayJob CRD schema, offline.

    python scripts/check_rayjob.py PATH/TO/ray.io_rayjobs.yaml [deploy/rayjob.yaml]

The CRD is KubeRay's (ray-operator/config/crd/bases/ray.io_rayjobs.yaml in github.com/ray-project/kuberay);
it is not vendored here. Its openAPIV3Schema for the manifest's apiVersion is checked with jsonschema,
strictly: an object that lists its properties accepts no other key (as `kubectl apply --validate=strict`
refuses unknown fields, where the API server would otherwise drop them silently).
Exit 0 when valid, 4 with every problem listed otherwise.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import jsonschema
import yaml


def strict(schema: Any) -> Any:
    """The schema with additionalProperties: false wherever properties are listed and unknown fields are not kept."""
    if isinstance(schema, dict):
        out = {k: strict(v) for k, v in schema.items()}
        if "properties" in out and "additionalProperties" not in out \
                and not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


def main(argv: list[str]) -> int:
    if not 1 <= len(argv) <= 2:
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    crd = yaml.safe_load(Path(argv[0]).read_text())
    manifest = yaml.safe_load(Path(argv[1] if len(argv) > 1 else "deploy/rayjob.yaml").read_text())
    group, _, version = manifest["apiVersion"].partition("/")
    if manifest.get("kind") != crd["spec"]["names"]["kind"] or group != crd["spec"]["group"]:
        print(f"not a {crd['spec']['names']['kind']} of {crd['spec']['group']}", file=sys.stderr)
        return 4
    versions = {v["name"]: v for v in crd["spec"]["versions"]}
    if version not in versions:
        print(f"apiVersion {version} is not served by this CRD ({', '.join(versions)})", file=sys.stderr)
        return 4
    schema = strict(versions[version]["schema"]["openAPIV3Schema"])
    schema["properties"].pop("metadata", None)  # ObjectMeta is checked by the API server, not the CRD
    body = {k: v for k, v in manifest.items() if k != "metadata"}
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(body), key=lambda e: list(e.absolute_path))
    for error in errors:
        print(f"{'.'.join(map(str, error.absolute_path)) or '(root)'}: {error.message}", file=sys.stderr)
    if errors:
        return 4
    print(f"OK: valid {manifest['kind']} ({manifest['apiVersion']}) per the CRD schema, unknown fields refused")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
