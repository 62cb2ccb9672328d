"""Monitoring: drift checks of served or batch images, the retraining ledger, and the drift simulator."""
