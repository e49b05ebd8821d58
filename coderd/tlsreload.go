package coderd

import (
	"crypto/sha256"
	"crypto/tls"
	"fmt"
	"io"
	"os"
	"sync"
	"time"

	"github.com/coder/quartz"
	"go.uber.org/zap"
)

// certReloader serves the TLS certificate from a certificate and key file
// and loads them again when they change (cert-manager and certbot replace
// them in place), so renewals need no restart. It looks at the files at
// most once per checkEvery, on a handshake, comparing a hash of their
// contents. A new pair that does not load keeps the old certificate and is
// logged once, until the files change again.
type certReloader struct {
	certFile, keyFile string
	checkEvery        time.Duration
	clock             quartz.Clock
	log               *zap.Logger

	mu        sync.Mutex
	cert      *tls.Certificate
	loaded    fileStamp // the files' stamp when cert was loaded
	failed    fileStamp // the stamp of the last pair that failed to load
	failedKey string    // what was last logged about a failure
	lastCheck time.Time
}

// fileStamp identifies a version of the pair of files: a hash of their
// contents (modification times can repeat within a clock tick, sizes
// often repeat across renewals).
type fileStamp [sha256.Size]byte

func stampFiles(certFile, keyFile string) (fileStamp, error) {
	h := sha256.New()
	for _, name := range []string{certFile, keyFile} {
		f, err := os.Open(name)
		if err != nil {
			return fileStamp{}, err
		}
		_, err = io.Copy(h, io.LimitReader(f, 1<<20))
		f.Close()
		if err != nil {
			return fileStamp{}, err
		}
		h.Write([]byte{0})
	}
	var st fileStamp
	copy(st[:], h.Sum(nil))
	return st, nil
}

// newCertReloader loads the pair once (an error here is a start-up error)
// and paces its later checks on clock.
func newCertReloader(certFile, keyFile string, checkEvery time.Duration, clock quartz.Clock, log *zap.Logger) (*certReloader, error) {
	st, err := stampFiles(certFile, keyFile)
	if err != nil {
		return nil, err
	}
	cert, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		return nil, err
	}
	return &certReloader{certFile: certFile, keyFile: keyFile, checkEvery: checkEvery, clock: clock, log: log,
		cert: &cert, loaded: st, lastCheck: clock.Now()}, nil
}

// GetCertificate is the tls.Config hook.
func (r *certReloader) GetCertificate(*tls.ClientHelloInfo) (*tls.Certificate, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.clock.Since(r.lastCheck) >= r.checkEvery {
		r.lastCheck = r.clock.Now()
		r.maybeReloadLocked()
	}
	return r.cert, nil
}

func (r *certReloader) maybeReloadLocked() {
	st, err := stampFiles(r.certFile, r.keyFile)
	if err != nil {
		r.failLocked(fileStamp{}, err)
		return
	}
	if st == r.loaded || st == r.failed {
		return
	}
	cert, err := tls.LoadX509KeyPair(r.certFile, r.keyFile)
	if err != nil {
		r.failLocked(st, err)
		return
	}
	r.cert, r.loaded, r.failed, r.failedKey = &cert, st, fileStamp{}, ""
	r.log.Info("reloaded the tls certificate", zap.String("cert_file", r.certFile))
}

// failLocked logs a failed reload once per version of the files (and
// once per reason while they cannot even be read).
func (r *certReloader) failLocked(st fileStamp, err error) {
	r.failed = st
	key := fmt.Sprintf("%v|%v", st, err)
	if key == r.failedKey {
		return
	}
	r.failedKey = key
	r.log.Error("cannot reload the tls certificate: still serving the previous one",
		zap.String("cert_file", r.certFile), zap.String("key_file", r.keyFile), zap.Error(err))
}
