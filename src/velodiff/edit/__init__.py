"""Editing and control: inversion (``inversion``), prompt-to-prompt (``p2p``), region brushes."""
