"""GAIR's request defaults, shared by the library (`factory.gair`) and the HTTP API (`serve.api`)."""

# Cosine (image vs text) by which the top item of an α's query may match the intent less well than the best
# α's and still be chosen for looking more like the concept (`factory.gair.choose_alpha`, rule
# "retrieval"). 2.0 is no veto at all (cosines differ by at most 2): the α whose top item is most like the
# concept's images wins; the intent still shapes every α's query, on both sides of the balance. Chosen on
# world seed 0 only, by MRR among the margins 0, .01, .02, .03, .05, .1 and none (README "GAIR's rule":
# 0.548 ... 0.845 and 0.859 with none; the oracle α 0.861); rechecked this round against GAIR's own fixed
# balances (0.541 ... 0.854, none 0.868, oracle 0.875); reported on seeds 1-3 with intervals.
DEFAULT_INTENT_MARGIN = 2.0

# Most bisection rounds a GAIR request may ask for (`factory.gair.bisection_alphas`): 8 halve the default
# schedule's 0.25 bracket to 0.001, finer than two queries can be told apart.
MAX_REFINE = 8
