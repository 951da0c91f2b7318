"""GAIR's request defaults, shared by the library (`factory.gair`) and the HTTP API (`serve.api`)."""

# Cosine (image vs text) by which the top item of an α's query may match the intent less well than the best
# α's and still be chosen for looking more like the concept (`factory.gair.choose_alpha`, rule
# "retrieval"). Chosen on world seed 0 only; README "GAIR's rule" shows the sweep and the other seeds.
DEFAULT_INTENT_MARGIN = 0.02
