# The image the Helm chart runs: a static coder binary on distroless, as a
# non-root user. The built-in Postgres is not in it: in Kubernetes every
# replica uses the shared external Postgres (CODER_PG_CONNECTION_URL).
FROM golang:1.26 AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
ARG VERSION=dev
RUN CGO_ENABLED=0 go build -trimpath \
      -ldflags "-s -w -X github.com/coder-ha/coder/cmd/cli.Version=${VERSION}" \
      -o /coder ./cmd/coder

FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /coder /coder
USER 65532:65532
EXPOSE 8080 2112
ENTRYPOINT ["/coder"]
CMD ["server"]
