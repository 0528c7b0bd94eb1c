/* A test DApp: writes what it sees of its sandbox into its output volume. */
#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static int by_name(const void *a, const void *b) {
    return strcmp(*(char *const *)a, *(char *const *)b);
}

static int write_text(const char *path, const char *text) {
    FILE *out = fopen(path, "w");
    if (out == NULL || fputs(text, out) < 0 || fclose(out) != 0) {
        perror(path);
        return 1;
    }
    return 0;
}

int main(void) {
    char *names[512];
    int count = 0;
    DIR *root = opendir("/");
    struct dirent *entry;
    if (root == NULL) {
        perror("/");
        return 1;
    }
    while ((entry = readdir(root)) != NULL && count < 512) {
        if (strcmp(entry->d_name, ".") != 0 && strcmp(entry->d_name, "..") != 0)
            names[count++] = strdup(entry->d_name);
    }
    closedir(root);
    qsort(names, count, sizeof names[0], by_name);
    char listing[16384] = "";
    for (int i = 0; i < count; i++) {
        strncat(listing, names[i], sizeof listing - strlen(listing) - 2);
        strcat(listing, "\n");
    }
    char hostname[256] = "";
    FILE *file = fopen("/etc/hostname", "r");
    if (file != NULL) {
        size_t got = fread(hostname, 1, sizeof hostname - 1, file);
        hostname[got] = '\0';
        fclose(file);
    }
    char ids[64];
    snprintf(ids, sizeof ids, "%d:%d\n", (int)getuid(), (int)getgid());
    return write_text("/encryptedOutputs/listing.txt", listing)
        | write_text("/encryptedOutputs/hostname.txt", hostname)
        | write_text("/encryptedOutputs/ids.txt", ids);
}
