"""Report helpers: figures (loss / precision-recall curves, instance overlays) for ``bestie.stages.report``."""
