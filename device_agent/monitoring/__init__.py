"""What the model sees and says, as mergeable histograms.

- `channels`: which scalar values per inference are summarised (shared by the build and the agent).
- `reference`: reference histograms and the binning rule.
- `summary`: the window summary value (`zero`, `update`, `merge`).
- `summary_codec`: its wire form (JSON, zlib, content types); `summary_validation`: checks of a hostile document.
- `dispersion`: how far a window's inferences are from independent draws.
- `window`: the open window on the hot path.
"""
