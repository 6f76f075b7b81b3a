# Thin aliases over ./dev, which is what the README and CI use.
.PHONY: up down status test lint fmt gen bench
up:
	./dev up
down:
	./dev down
status:
	./dev status
test:
	./dev test
lint:
	./dev lint
fmt:
	./dev fmt
gen:
	./dev gen
bench:
	./dev bench
