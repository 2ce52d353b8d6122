"""Blind paired human-preference studies between generators: items and key (study), the participant page
(page), Label Studio and MTurk manifests (manifests), returned votes (votes) and their analysis (analysis)."""
