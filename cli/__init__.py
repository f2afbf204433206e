"""The operator's interface: `hes` for the head-end and `meter-sim` for the simulator."""
