package coderd

import (
	"bufio"
	"encoding/json"
	"net/http"
)

// Response is the body of every error answer: a one-line message for
// people and, where useful, a detail for debugging.
type Response struct {
	Message string `json:"message"`
	Detail  string `json:"detail,omitempty"`
}

// writeJSONList writes items as a JSON array, one element at a time and
// without indentation: for the one answer that grows with N² (the replica
// list, each row with its latency matrix: about 1 MB indented at N=100).
// Encoded whole, it cost a buffer that size kept in the encoder's pool
// plus an indented copy per request; element by element, memory is
// bounded by one row and the body is a third smaller.
func writeJSONList[T any](w http.ResponseWriter, status int, items []T) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	bw := bufio.NewWriterSize(w, 32<<10)
	enc := json.NewEncoder(bw)
	_ = bw.WriteByte('[')
	for i := range items {
		if i > 0 {
			_ = bw.WriteByte(',')
		}
		_ = enc.Encode(items[i])
	}
	_, _ = bw.WriteString("]\n")
	_ = bw.Flush()
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	_ = enc.Encode(v)
}

// writeError answers with a JSON Response. The detail is shown to whoever
// asked: never put a database or driver error in it on a path a caller
// without a valid token can reach (log it instead).
func writeError(w http.ResponseWriter, status int, message, detail string) {
	writeJSON(w, status, Response{Message: message, Detail: detail})
}
