# The two commands a new user needs: `make run` and `make test`.
SHELL := /bin/bash
VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS := -X github.com/coder-ha/coder/cmd/cli.Version=$(VERSION)
GO ?= go

.PHONY: build run test test-go test-helm lint deps bench test-ha clean

## build: compile bin/coder
build:
	$(GO) build -ldflags "$(LDFLAGS)" -o bin/coder ./cmd/coder

## run: build and start one server on the built-in Postgres at http://127.0.0.1:3000
run: deps build
	./bin/coder server

## test: every test, with the race detector, against real Postgres and real DERP
test: deps test-go test-helm

test-go:
	$(GO) test -race -timeout 20m ./...

test-helm:
	cd helm && $(GO) test -timeout 10m ./...

## test-ha: the fault-injection suite (real processes, Postgres outage, kill -9, partitions)
test-ha: deps
	$(GO) test -race -tags ha -count=1 -timeout 15m -v ./internal/hatest/ 2>&1 | tee /tmp/coder-test-ha.log | grep -E '^(=== RUN|--- |PASS|FAIL|ok|\s+[a-z_]+_test.go:[0-9]+)'; exit $${PIPESTATUS[0]}

## bench: convergence, failure detection, relay throughput vs derper, heartbeat cost, footprint;
## prints a markdown table and writes bench-results/results.{md,json}
bench: deps build
	BENCH_OUT=$(CURDIR)/bench-results $(GO) test -tags bench -count=1 -timeout 60m -run TestBench ./internal/bench/ > bench-results.log 2>&1 || (tail -50 bench-results.log; exit 1)
	@cat bench-results/results.md

## lint: gofmt, go vet, and go.mod/go.sum as go mod tidy leaves them
lint:
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt would change:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...
	@$(GO) mod tidy -diff || { echo "go.mod/go.sum are not tidy: run go mod tidy"; exit 1; }

## deps: install the system packages the server and tests need (PostgreSQL binaries;
## HAProxy, PgBouncer, promtool, Chromium with WITH_HAPROXY=1, WITH_PGBOUNCER=1,
## WITH_PROMTOOL=1, WITH_CHROMIUM=1)
deps:
	@./scripts/deps.sh

clean:
	rm -rf bin
