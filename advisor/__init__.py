"""The disaggregation advisor: "should I split prefill and decode onto separate GPU pools?", with numbers.

Pipeline (one file per stage, DESIGN.md "The advisor"):

* ``step_model.py``: step-time model fitted on the operator's step records (robust, held-out error), TP
  extrapolation and a roofline fallback, both flagged;
* ``workload.py``: the traffic, from the engine's request log, a Prometheus range query, or a spec;
* ``inputs.py``: SLOs and the cluster, validated;
* ``screen.py``: closed-form goodput of every split, colocated chunk budget and conditional threshold;
* ``simulator.py``: discrete-event simulation of one placement;
* ``search.py``: goodput binary search of the finalists, the decision rule and its computed reasons;
* ``report.py``: terminal tables, JSON, a self-contained HTML page, ``phaselens_advisor_*`` metrics;
* ``commands.py``: ``phaselens advise``.
"""
