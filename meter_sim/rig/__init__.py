"""Hardware-in-the-loop rigs: simulated meters on a serial line doing what a scenario file says
(a timeline of steps and line faults), with expectations about the master on the other end
checked while it runs, and reports a CI can read (docs/hil.md).

* :mod:`meter_sim.rig.scenario`: the scenario file, its schema, validation and reference.
* :mod:`meter_sim.rig.faults`: the line as the meters see it: faults, the capture, the exchanges.
* :mod:`meter_sim.rig.expect`: the expectations, judged from what the rig saw.
* :mod:`meter_sim.rig.runner`: runs a scenario on a line.
* :mod:`meter_sim.rig.reports`: JUnit XML, the CSV and pcap captures.
"""
