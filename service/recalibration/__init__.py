"""Live recalibration: traffic accumulated for the table refit, the candidate version run in shadow, and
the persisted choice of the served version (activate, roll back). See service/README.md."""
