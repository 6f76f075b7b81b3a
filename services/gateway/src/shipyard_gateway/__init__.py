"""The gateway: routes predictions to ready instances."""
