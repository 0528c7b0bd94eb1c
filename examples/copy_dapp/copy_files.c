/*
 * copy_files: the copy DApp.
 *
 * Copies every file and folder under /encryptedInputs to /encryptedOutputs,
 * recursively, keeping content and permission bits. It is an ordinary,
 * unmodified program: the tdapp runtime mounts the decrypted input volume and
 * the output volume at these paths and seals what it writes.
 *
 * Usage: copy_files [FROM [TO]]   (defaults: /encryptedInputs /encryptedOutputs)
 *
 * Every failure is reported as "copy_files: PATH: what failed: reason" on
 * stderr; the program goes on with the other files and exits with status 1 if
 * anything could not be copied, so a partial copy never looks like a success.
 * Symbolic links and special files are not copied (and count as failures):
 * a link could point the program at a file outside the volume.
 */
#define _POSIX_C_SOURCE 200809L

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

#define BUFFER_SIZE (64 * 1024)

static unsigned long files_copied;
static unsigned long long bytes_copied;
static int failures;

static void fail(const char *path, const char *what)
{
    fprintf(stderr, "copy_files: %s: %s: %s\n", path, what, strerror(errno));
    failures++;
}

/* Writes all of buf, retrying short writes and interrupted calls. */
static int write_all(int fd, const char *buf, size_t len)
{
    while (len > 0) {
        ssize_t done = write(fd, buf, len);
        if (done < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        buf += done;
        len -= (size_t)done;
    }
    return 0;
}

static void copy_file(int from_dir, int to_dir, const char *name, const char *path,
                      mode_t mode)
{
    static char buffer[BUFFER_SIZE];
    int in = openat(from_dir, name, O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
    if (in < 0) {
        fail(path, "cannot open input file");
        return;
    }
    int out = openat(to_dir, name, O_WRONLY | O_CREAT | O_TRUNC | O_NOFOLLOW | O_CLOEXEC,
                     0600);
    if (out < 0) {
        fail(path, "cannot create output file");
        close(in);
        return;
    }
    int ok = 1;
    unsigned long long size = 0;
    for (;;) {
        ssize_t got = read(in, buffer, sizeof buffer);
        if (got < 0 && errno == EINTR)
            continue;
        if (got < 0) {
            fail(path, "cannot read input file");
            ok = 0;
            break;
        }
        if (got == 0)
            break;
        if (write_all(out, buffer, (size_t)got) < 0) {
            fail(path, "cannot write output file");
            ok = 0;
            break;
        }
        size += (unsigned long long)got;
    }
    if (fchmod(out, mode & 07777) < 0) {
        fail(path, "cannot set permissions of output file");
        ok = 0;
    }
    /* Some file systems (FUSE, NFS) only report a failed write when the file is closed. */
    if (close(out) < 0) {
        fail(path, "cannot finish output file");
        ok = 0;
    }
    close(in);
    if (ok) {
        files_copied++;
        bytes_copied += size;
    }
}

static void copy_folder(int from_dir, int to_dir, const char *path)
{
    int listing = dup(from_dir);
    if (listing < 0) {
        fail(path, "cannot read folder");
        return;
    }
    DIR *dir = fdopendir(listing);
    if (dir == NULL) {
        fail(path, "cannot read folder");
        close(listing);
        return;
    }
    struct dirent *entry;
    errno = 0;
    while ((entry = readdir(dir)) != NULL) {
        const char *name = entry->d_name;
        if (strcmp(name, ".") == 0 || strcmp(name, "..") == 0)
            continue;
        char child[PATH_MAX];
        if (snprintf(child, sizeof child, "%s/%s", path, name) >= (int)sizeof child) {
            errno = ENAMETOOLONG;
            fail(path, "path of a file in it is too long");
            continue;
        }
        struct stat info;
        if (fstatat(from_dir, name, &info, AT_SYMLINK_NOFOLLOW) < 0) {
            fail(child, "cannot inspect");
        } else if (S_ISREG(info.st_mode)) {
            copy_file(from_dir, to_dir, name, child, info.st_mode);
        } else if (S_ISDIR(info.st_mode)) {
            if (mkdirat(to_dir, name, 0700) < 0 && errno != EEXIST) {
                fail(child, "cannot create output folder");
            } else {
                int sub_from = openat(from_dir, name,
                                      O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
                int sub_to = openat(to_dir, name,
                                    O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
                if (sub_from < 0)
                    fail(child, "cannot open input folder");
                else if (sub_to < 0)
                    fail(child, "cannot open output folder");
                else {
                    copy_folder(sub_from, sub_to, child);
                    /* Permissions last, so a read-only folder can still be filled. */
                    if (fchmod(sub_to, info.st_mode & 07777) < 0)
                        fail(child, "cannot set permissions of output folder");
                }
                if (sub_from >= 0)
                    close(sub_from);
                if (sub_to >= 0)
                    close(sub_to);
            }
        } else {
            fprintf(stderr, "copy_files: %s: is %s; not copied (only regular files and "
                    "folders are copied)\n", child,
                    S_ISLNK(info.st_mode) ? "a symbolic link" : "a special file");
            failures++;
        }
        errno = 0;
    }
    if (errno != 0)
        fail(path, "cannot read folder");
    closedir(dir);
}

int main(int argc, char **argv)
{
    if (argc > 3) {
        fprintf(stderr, "usage: copy_files [FROM [TO]]\n");
        return 2;
    }
    const char *from = argc > 1 ? argv[1] : "/encryptedInputs";
    const char *to = argc > 2 ? argv[2] : "/encryptedOutputs";

    int from_dir = open(from, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (from_dir < 0) {
        fail(from, "cannot open input folder");
        return 1;
    }
    if (mkdir(to, 0700) < 0 && errno != EEXIST) {
        fail(to, "cannot create output folder");
        return 1;
    }
    int to_dir = open(to, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (to_dir < 0) {
        fail(to, "cannot open output folder");
        return 1;
    }
    copy_folder(from_dir, to_dir, from);
    close(from_dir);
    close(to_dir);

    printf("copy_files: copied %lu file%s (%llu bytes) from %s to %s\n", files_copied,
           files_copied == 1 ? "" : "s", bytes_copied, from, to);
    if (failures > 0) {
        fprintf(stderr, "copy_files: %d failure%s; the output is incomplete\n", failures,
                failures == 1 ? "" : "s");
        return 1;
    }
    return 0;
}
