"""`edge-kit fleet enroll DEVICE_ID --ca DIR [--out DIR] [--days N]`: a device's own key and certificate.

Creates the fleet CA in DIR when it has none. The certificate's identity (subject CN) is the device id,
which the broker uses as the MQTT username, so the ACL lets the device speak only for itself.
`--role service` issues the fleet service's identity; `--role broker --host NAME` the broker's own
server certificate. A device also gets `upload.token` beside its key: its credential for the fleet's
capture upload routes, derived from the CA folder's `device-token.key` (`fleet serve --device-key-file`).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def run(args: argparse.Namespace) -> dict[str, Any]:
    from edge_kit.fleet.identity import FleetCA

    ca = FleetCA(args.ca)
    role = getattr(args, "role", "device")
    stem = args.device_id if role == "device" else role
    out = Path(args.out) if args.out else Path(args.ca) / "issued" / stem
    issued = ca.issue(args.device_id or "", out, role=role, days=args.days, hosts=tuple(args.host or ()),
                      force=args.force)
    if not getattr(args, "json", False):
        if issued.ca_created:
            print(f"created the fleet CA in {ca.folder} (keep {ca.folder}/ca.key secret)")
        print(f"{issued.role} {issued.identity!r}: key {issued.key} (0600, copy to the {issued.role} only), "
              f"certificate {issued.cert}, CA {issued.ca}; valid until {issued.not_after}, serial {issued.serial:x}")
        if issued.upload_token is not None:
            print(f"upload token {issued.upload_token} (0600, copy to the device: [capture] token_file); the fleet "
                  f"checks it with `fleet serve --device-key-file {ca.device_key_path}`")
    out_doc = issued.describe() | {"crl": str(ca.crl_path)}
    if issued.upload_token is not None:
        out_doc["device_key"] = str(ca.device_key_path)
    return out_doc
