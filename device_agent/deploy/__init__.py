"""Bundles that arrive over the network: the deployment message, the download, the install.

- `message`: the retained MQTT message that points a device at a bundle (one definition for the
  agent and the fleet server), and the `deployment` block of the agent's status.
- `download`: a resumable, capped, sha256-checked HTTP(S) download into a staging folder.
- `updater`: acts on a message: download, verify, self-test, swap, keep the previous bundle, roll back.
"""
