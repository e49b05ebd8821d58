package coderd

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/coder/quartz"

	"github.com/coder-ha/coder/internal/wait"
)

// writePair writes a fresh self-signed certificate for name and its key.
func writePair(t *testing.T, certFile, keyFile, name string) {
	t.Helper()
	priv, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(time.Now().UnixNano()),
		Subject:      pkix.Name{CommonName: name},
		DNSNames:     []string{name},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &priv.PublicKey, priv)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, err := x509.MarshalECPrivateKey(priv)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: keyDER}), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
}

// servedName is the common name of the certificate a real TLS handshake
// with addr gets.
func servedName(t *testing.T, addr string) string {
	t.Helper()
	conn, err := tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", addr, &tls.Config{InsecureSkipVerify: true}) //nolint:gosec // we inspect the certificate
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	return conn.ConnectionState().PeerCertificates[0].Subject.CommonName
}

// Renewed certificate files are served without a restart; a broken
// renewal keeps the old certificate and is logged once.
func TestTLSCertificateIsReloadedWhenTheFilesChange(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	certFile, keyFile := filepath.Join(dir, "tls.crt"), filepath.Join(dir, "tls.key")
	writePair(t, certFile, keyFile, "first.example.com")
	core, logs := observer.New(zap.InfoLevel)
	r, err := newCertReloader(certFile, keyFile, 0, quartz.NewReal(), zap.New(core))
	if err != nil {
		t.Fatal(err)
	}
	l, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{GetCertificate: r.GetCertificate, MinVersion: tls.VersionTLS12})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				_ = c.(*tls.Conn).Handshake()
				_ = c.Close()
			}()
		}
	}()
	addr := l.Addr().String()
	if got := servedName(t, addr); got != "first.example.com" {
		t.Fatalf("served %q, want first.example.com", got)
	}

	writePair(t, certFile, keyFile, "renewed.example.com")
	wait.For(t, 10*time.Second, "the renewed certificate to be served", func() bool {
		return servedName(t, addr) == "renewed.example.com"
	})

	// A half-written renewal: the key no longer matches.
	if err := os.WriteFile(keyFile, []byte("-----BEGIN EC PRIVATE KEY-----\ngarbage\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 5; i++ {
		if got := servedName(t, addr); got != "renewed.example.com" {
			t.Fatalf("after a broken renewal served %q, want the previous certificate", got)
		}
	}
	if n := logs.FilterMessage("cannot reload the tls certificate: still serving the previous one").Len(); n != 1 {
		t.Fatalf("the broken renewal was logged %d times over 5 handshakes, want once", n)
	}

	writePair(t, certFile, keyFile, "fixed.example.com")
	wait.For(t, 10*time.Second, "the fixed certificate to be served", func() bool {
		return servedName(t, addr) == "fixed.example.com"
	})
}
