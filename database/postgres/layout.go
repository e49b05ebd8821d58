package postgres

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"syscall"

	"go.uber.org/zap"
)

// rootLayout decides, when we run as root, where the data directory goes,
// and makes Dir safe for root to write in:
//
//   - Dir is root's: a Dir left owned by the postgres user (older versions
//     handed it over) is taken back, so the postgres user cannot plant a
//     symlink where root writes the password, port, lock and log files.
//   - If the postgres user can reach Dir through its parents as they are,
//     the data directory is Dir/data (Dir gets search permission for
//     others: it is ours; its parents are never changed).
//   - Otherwise (Dir under /root, say) the data directory is
//     SharedDir/<hash of Dir>, below a root-owned SharedDir.
//
// The data directory itself belongs to the postgres user; root never writes
// into it.
func (c *Cluster) rootLayout() error {
	log := c.opts.Logger
	if err := ensureRootDir(c.opts.Dir, false); err != nil {
		return err
	}
	if reachable(filepath.Dir(c.opts.Dir)) {
		if err := addSearch(c.opts.Dir); err != nil {
			return err
		}
		c.data = filepath.Join(c.opts.Dir, "data")
	} else {
		base := c.opts.SharedDir
		if err := os.MkdirAll(base, 0o711); err != nil {
			return fmt.Errorf("postgres: create %s: %w", base, err)
		}
		if err := ensureRootDir(base, true); err != nil {
			return err
		}
		if !reachable(base) {
			return fmt.Errorf("postgres: running as root, the postgres user can reach neither %s nor %s; use a --cache-dir below directories everyone may traverse (e.g. /var/cache/coder), run as another user, or pass --postgres-url", c.opts.Dir, base)
		}
		sum := sha256.Sum256([]byte(c.opts.Dir))
		c.data = filepath.Join(base, hex.EncodeToString(sum[:8]))
		log.Info("the postgres user cannot reach the cache dir without loosening its parents: keeping the built-in postgres data in the shared directory",
			zap.String("cache_dir", c.opts.Dir), zap.String("data_dir", c.data))
	}
	if _, err := os.Lstat(c.data); err == nil {
		if err := c.makeDataDir(); err != nil { // checks it and hands it over
			return err
		}
	}
	log.Info("built-in postgres data directory", zap.String("dir", c.data), zap.String("owner", "postgres"))
	return nil
}

// ensureRootDir checks that dir is a real directory (not a symlink) and
// makes root its owner. With searchable, others get search permission.
func ensureRootDir(dir string, searchable bool) error {
	st, err := os.Lstat(dir)
	if err != nil {
		return fmt.Errorf("postgres: %w", err)
	}
	if !st.IsDir() {
		return fmt.Errorf("postgres: %s is not a directory (a symlink is refused when running as root)", dir)
	}
	if sys, ok := st.Sys().(*syscall.Stat_t); ok && (sys.Uid != 0 || sys.Gid != 0) {
		if err := os.Lchown(dir, 0, 0); err != nil {
			return fmt.Errorf("postgres: take back %s for root: %w", dir, err)
		}
	}
	// Nobody but root may create or replace entries in it.
	perm := st.Mode().Perm() &^ 0o022
	if searchable {
		perm |= 0o011
	}
	if perm != st.Mode().Perm() {
		if err := os.Chmod(dir, perm); err != nil {
			return fmt.Errorf("postgres: chmod %s: %w", dir, err)
		}
	}
	return nil
}

// addSearch lets others traverse dir (never list it).
func addSearch(dir string) error {
	st, err := os.Lstat(dir)
	if err != nil {
		return fmt.Errorf("postgres: %w", err)
	}
	if st.Mode().Perm()&0o001 == 0 {
		if err := os.Chmod(dir, st.Mode().Perm()|0o001); err != nil {
			return fmt.Errorf("postgres: chmod %s: %w", dir, err)
		}
	}
	return nil
}

// reachable reports whether every directory from / down to dir lets others
// traverse it, so the postgres user can reach what is below dir.
func reachable(dir string) bool {
	for p := dir; ; p = filepath.Dir(p) {
		st, err := os.Stat(p)
		if err != nil || st.Mode().Perm()&0o001 == 0 {
			return false
		}
		if p == filepath.Dir(p) {
			return true
		}
	}
}

// readFileNoFollow reads path, refusing a symlink in its last element and
// anything but a regular file (a FIFO would block the open or the read, a
// device like /dev/zero would never end).
func readFileNoFollow(path string) ([]byte, error) {
	f, err := os.OpenFile(path, os.O_RDONLY|syscall.O_NOFOLLOW|syscall.O_NONBLOCK, 0)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	if st, err := f.Stat(); err != nil {
		return nil, err
	} else if !st.Mode().IsRegular() {
		return nil, fmt.Errorf("%s is not a regular file", path)
	}
	return io.ReadAll(io.LimitReader(f, 1<<20))
}

// openNoFollow opens (creating, mode 0600) a file root keeps in Dir. What
// an older layout may have left there when Dir belonged to the postgres
// user is removed, never used: a symlink, a FIFO (opening it would block),
// anything but a regular file, or a file with another hard link (it may be
// any file on the file system when fs.protected_hardlinks is off).
func openNoFollow(path string, flag int) (*os.File, error) {
	const safe = syscall.O_NOFOLLOW | syscall.O_NONBLOCK
	f, err := os.OpenFile(path, flag|safe, 0o600)
	switch {
	case errors.Is(err, syscall.ELOOP), errors.Is(err, syscall.ENXIO):
	case err != nil:
		return nil, err
	default:
		st, serr := f.Stat()
		if serr != nil {
			f.Close()
			return nil, serr
		}
		if sys, ok := st.Sys().(*syscall.Stat_t); st.Mode().IsRegular() && ok && sys.Nlink == 1 {
			return f, nil
		}
		f.Close()
	}
	if err := os.Remove(path); err != nil {
		return nil, err
	}
	return os.OpenFile(path, flag|os.O_CREATE|os.O_EXCL|safe, 0o600)
}

// writeFileAtomic writes dir/name through a temporary file created with
// O_EXCL|O_NOFOLLOW and renamed over name: whatever was at name (a
// symlink included) is replaced, never written through.
func writeFileAtomic(dir, name string, data []byte) error {
	tmp := filepath.Join(dir, "."+name+".tmp")
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_EXCL|syscall.O_NOFOLLOW, 0o600)
	if errors.Is(err, os.ErrExist) {
		_ = os.Remove(tmp) // left by a crash; Remove never follows a symlink
		f, err = os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_EXCL|syscall.O_NOFOLLOW, 0o600)
	}
	if err != nil {
		return err
	}
	_, err = f.Write(data)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, filepath.Join(dir, name))
	}
	if err != nil {
		_ = os.Remove(tmp)
	}
	return err
}
