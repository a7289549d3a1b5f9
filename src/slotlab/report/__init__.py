"""Pictures and reports: loss curves, mask galleries, per-slot images, the HTML/Markdown report."""
